"""heron's OpenAI-compatible HTTP server (`heron serve`).

`api_server.build_app(state)` makes the FastAPI app, `api_server.run_server(args)` runs it.
"""
