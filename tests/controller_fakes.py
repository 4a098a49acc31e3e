"""In-process stand-ins for the three actor groups and the weight sync, with the methods
:class:`rlsys.grpo.trainer.Groups` names. They record what the controller asked of them, so
tests of its logic (dynamic sampling, staleness, resume, refusals, failed rewards) run in
milliseconds without Ray, vLLM or DeepSpeed.

An answer's text names the image it answers and the weights version that generated it
(``"img3.png#1@v2"``: sample 3's second answer, from the weights after 2 updates); its token ids
are ``[10 + k, 100 + version]``, so a test reads the staleness of every learnt answer from the
learner's items.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlsys.data.samples import Instance, Sample
from rlsys.grpo.records import Answer, LearnerStats, Refusal, Score


def samples(n: int) -> list[Sample]:
    """``n`` one-box detection samples; sample ``i``'s image is ``img{i}.png`` (never opened)."""
    return [
        Sample(
            id=f"s{i}",
            image=f"img{i}.png",
            width=100,
            height=100,
            task="detection",
            phrases=["circle"],
            instances=[Instance("circle", box=(10.0, 10.0, 40.0, 40.0))],
        )
        for i in range(n)
    ]


def image_index(text: str) -> int:
    return int(text.split("#")[0].removeprefix("img").removesuffix(".png"))


def version_of_ids(response_ids: list[int]) -> int:
    return response_ids[1] - 100


class FakeProcessor:
    """The chat template, as text: enough for prompts to carry their question."""

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=False):
        return "<user><image>" + msgs[0]["content"][1]["text"] + "<assistant>"


class FakeRollouts:
    """G answers per request, from the weights version the engines hold when it is submitted.
    Requests for an image in ``refuse`` come back as a :class:`Refusal`, for one in ``unreadable``
    as a Refusal of an image that did not decode."""

    def __init__(self, group_size: int, refuse: set[str] = frozenset(), unreadable: set[str] = frozenset()):
        self.G, self.refuse, self.unreadable = group_size, set(refuse), set(unreadable)
        self.version = 0  # set by FakeWeights.push
        self.submitted: list[tuple[int, list[str]]] = []  # (step, images) per submit
        self.restarts = 0
        self.on_restart = None

    def submit(self, requests: list[dict], *, step: int):
        self.submitted.append((step, [r["image"] for r in requests]))
        return {"requests": requests, "version": self.version}

    def collect(self, job) -> list:
        out = []
        for r in job["requests"]:
            if r["image"] in self.refuse:
                out.append(Refusal("prompt longer than the context"))
                continue
            if r["image"] in self.unreadable:
                out.append(Refusal(f"{r['image']}: OSError: image file is truncated", image_unreadable=True))
                continue
            out.append(
                [
                    Answer(
                        text=f"{r['image']}#{k}@v{job['version']}",
                        token_ids=[10 + k, 100 + job["version"]],
                        logprobs=[-1.0, -1.0],
                        prompt_ids=None,
                    )
                    for k in range(self.G)
                ]
            )
        return out

    def checksums(self) -> list[dict]:
        """One engine's digest: the weights version it holds, as a one-tensor digest."""
        return [{"per_name": {"version": (1, float(self.version), 0.0)}}]

    def prompt_logprobs(self, prompt: str, image: str):
        return [([1, 2], [-float(self.version), -1.0])]

    def shutdown(self):
        pass


class FakeRewards:
    """``reward(image index, answer k) -> float | None`` (None: the scorer failed twice)."""

    def __init__(self, reward):
        self.reward = reward
        self.calls = 0
        self.replaced = 0

    def score(self, batch: list[tuple[str, dict]], group_size: int = 1) -> list[Score]:
        self.calls += 1
        out = []
        for text, _sample in batch:
            r = self.reward(image_index(text), int(text.split("#")[1].split("@")[0]))
            out.append(Score.failure("exploded") if r is None else Score(reward=r, kind="box_iou"))
        return out

    def shutdown(self):
        pass


class FakeLearners:
    """Records each update's items and the update count it was made at; saves a marker file."""

    def __init__(self):
        self.updates = 0
        self.trained: list[tuple[int, list]] = []  # (updates before this one, items)
        self.loaded: list[str] = []

    def reference(self, items):
        return [replace(it, ref_logp="ref") for it in items]

    def train(self, items) -> LearnerStats:
        if not items:
            raise ValueError("learner update with no answers to learn from")
        self.trained.append((self.updates, list(items)))
        self.updates += 1
        n = sum(len(it.response_ids) for it in items)
        return LearnerStats(tokens=n, answers=len(items), micro_batches=1, optimizer_steps=self.updates)

    def save(self, path: str):
        (Path(path) / "learner.txt").write_text(str(self.updates))

    def load(self, path: str):
        self.loaded.append(path)
        self.updates = int((Path(path) / "learner.txt").read_text())

    def checksum(self) -> dict:
        return {"per_name": {"version": (1, float(self.updates), 0.0)}}

    def prompt_logprobs(self, prompt: str, image: str):
        return [1, 2], [-float(self.updates), -1.0]

    def shutdown(self):
        pass


class FakeWeights:
    """A push gives the engines the learner's current weights version."""

    def __init__(self, learners: FakeLearners, rollouts: FakeRollouts):
        self.learners, self.rollouts = learners, rollouts
        self.pushes = 0

    def push(self) -> float:
        self.pushes += 1
        self.rollouts.version = self.learners.updates
        return 0.0
