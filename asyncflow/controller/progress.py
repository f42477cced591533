"""The run's progress bar: steps, reward, accuracy, tokens/s, staleness and ETA (tqdm).

Off when ``run.progress`` is false or stderr is not a terminal (CI logs get one line per
evaluation instead of carriage returns).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = tqdm(
            total=total,
            unit="step",
            dynamic_ncols=True,
            desc="asyncflow",
            disable=not enabled,
            file=sys.stderr,
        )
        self._errors_shown: set[str] = set()

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.set_description_str(f"asyncflow: {text}")

    def update(self, rec: dict[str, Any]) -> None:
        post = {
            "reward": f"{rec.get('reward_mean', float('nan')):.3f}",
            "acc": f"{rec.get('accuracy', float('nan')):.2f}",
            "tok/s": f"{rec.get('tokens_per_s', 0.0):.0f}",
            "stale": f"{rec.get('staleness_mean', 0.0):.2f}",
        }
        if "eval_accuracy" in rec:
            post["eval"] = f"{rec['eval_accuracy']:.3f}"
        if rec.get("reward_failures"):
            post["reward_fail"] = str(rec["reward_failures"])
        for error in rec.get("reward_errors", []):
            # each distinct message once (the first 20), even with the bar off
            if error not in self._errors_shown and len(self._errors_shown) < 20:
                self._errors_shown.add(error)
                tqdm.write(
                    f"warning: the reward function failed on a sample ({error}); it scores 0 "
                    "or is regenerated per reward.on_failure",
                    file=sys.stderr,
                )
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def update_to(self, step: int) -> None:
        """Start the bar at ``step`` (a resumed run)."""
        if step:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
