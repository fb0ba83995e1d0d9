"""Translation between API dialects: pure functions over parsed JSON, no I/O.

- `anthropic_upstream`: an OpenAI chat client in front of Anthropic's Messages API (the
  `anthropic` provider kind): chat request → Messages request, Message → chat completion,
  Messages SSE events → chat chunks.
- `anthropic_ingress`: an Anthropic client (`POST /v1/messages`) in front of an
  OpenAI-compatible deployment: Messages request → chat request, chat completion →
  Message, chat chunks → Messages SSE events.
- `anthropic_common`: what both share: errors both ways, usage, stop reasons, SSE framing.

docs/PROVIDERS.md records every choice made where the two APIs do not line up.
"""
