"""Upstream providers. PROVIDERS maps a config `kind` to its module's class, imported lazily
(gateway.providers.registry); config validation refuses a kind that is not listed here."""

PROVIDERS = {
    "openai": "gateway.providers.openai:OpenAIProvider",
    "azure": "gateway.providers.azure:AzureProvider",
    "anthropic": "gateway.providers.anthropic:AnthropicProvider",
    "mock": "gateway.providers.mock:MockProvider",
}
