"""``python -m appliance …`` is the ``terratile`` CLI (used where the script is not on PATH)."""

from appliance.cli.main import app

app()
