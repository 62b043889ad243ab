"""The OpenAI-compatible HTTP front end (DESIGN.md section 10): `sllmd --http HOST:PORT`.

    app.py            Starlette routes: /v1/chat/completions, /v1/completions, /v1/models, /healthz, /metrics
    openai_schema.py  an OpenAI request body -> InferRequest (unsupported fields refused by name)
    openai_objects.py the OpenAI response objects and stream chunks
    streaming.py      a node/cluster infer run on its own thread, bridged to the event loop; disconnects cancel
    errors.py         SllmError -> HTTP status and OpenAI's error body
    auth.py           --api-key-file: the key file and the Bearer check
    catalog.py        /v1/models from the node's (or the cluster's) models
    metrics.py        the Prometheus registry (names prefixed sllmd_)
    server.py         uvicorn on its own thread inside the daemon, with a clean shutdown
"""
