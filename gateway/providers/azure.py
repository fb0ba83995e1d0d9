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
        # model is the Azure deployment name
        return (
            f"{self.base_url}/openai/deployments/{model}{OPERATION_PATHS[operation]}"
            f"?api-version={self.config.api_version}"
        )
