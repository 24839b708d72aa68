"""The drop-in gateway: Ollama- and OpenAI-compatible endpoints that bill every call to a client.

`views` speaks the protocols, `ollama_wire` / `openai_wire` hold their exact wire formats,
`auth` resolves the API token, `joining` finds or starts the token's automatic session.
"""
