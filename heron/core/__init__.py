"""The hardware-neutral core: requests, sampling parameters, KV-cache manager,
scheduler, detokenizer and engine. Nothing here imports a device API."""
