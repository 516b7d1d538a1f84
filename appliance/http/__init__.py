"""The node's local HTTP face: the dashboard, Prometheus metrics and the health probes.

``server`` serves it on ``http.host``:``http.port``; ``metrics`` owns the Prometheus
registry; ``health`` answers ``/healthz`` and ``/readyz``; ``dashboard`` gathers what the
page shows; ``rendering`` draws map overlays and cell thumbnails; ``events`` pushes status
changes to open pages (server-sent events); ``access`` checks the token.
"""
