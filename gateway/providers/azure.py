"""Azure OpenAI: deployment URLs, api-version, the api-key header; OpenAI's wire format otherwise."""

from __future__ import annotations

from typing import ClassVar

from gateway.providers.base import OPERATION_PATHS
from gateway.providers.openai import OpenAIProvider


class AzureProvider(OpenAIProvider):
    kind: ClassVar[str] = "azure"

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.config.api_key} if self.config.api_key else {}

    def url_for(self, operation: str, model: str) -> str:
        if operation == "responses":
            # Azure serves the Responses API only on its v1 surface, which takes no
            # api-version and no deployment in the path: the body's model names the
            # deployment (upstream_body wrote it there).
            return f"{self.base_url}/openai/v1/responses"
        # model is the Azure deployment name
        return (
            f"{self.base_url}/openai/deployments/{model}{OPERATION_PATHS[operation]}"
            f"?api-version={self.config.api_version}"
        )
