"""Device profiles as data: one TOML file per device in this folder; adding a device is adding a file.

Nothing here is code the runtime depends on: ``edgekit.export.device`` reads the profiles at export, and a bundle
records what the runtime needs from them (execution providers, precision, context).
"""

from pathlib import Path

PROFILE_DIR = Path(__file__).parent
