"""Model repositories: the tier below SSD (DESIGN.md section 11).

    index.py     the repository's index.json (names, files, sizes, SHA-256 per file) and
                 `publish`, which adds a checkpoint to a repository directory atomically
    remote.py    where a repository's bytes come from: file:// or http(s):// (Range requests
                 over kept-alive connections, httpx)
    download.py  one model's resumable, verified, parallel download into a work directory
    fetcher.py   the node's side: which configured repository lists a model, one shared
                 download per model, space reserved in the SSD store first, then published
"""
