"""Run folders made by hand for bench tests: what ``RunDir.create_or_open`` leaves (its marker and config.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlprompt.harness.rundir import CONFIG_FILE, MARKER_FILE, STATE_FILE


def fake_run_folder(folder: Path, config: dict[str, Any], *, progress: bool = False) -> Path:
    """Make ``folder`` a vlprompt run folder holding ``config``; ``progress`` adds a checkpoint marker (state.json)
    so that it counts as a run that finished an epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_FILE).write_text('{"vlprompt_run": 1}', encoding="utf-8")
    (folder / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    if progress:
        (folder / STATE_FILE).write_text('{"epoch": 1, "files": {}}', encoding="utf-8")
    return folder
