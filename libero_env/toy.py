"""ToyVectorEnv: a cheap image-conditioned task behind the LiberoVectorEnv interface, to prove that GRPO learns.

The task ("push toward the marker"):
- The agentview image (224x224, light table) shows one dark coloured disk, the marker, and a small black disk,
  the cursor, which starts at the centre. The task fixes the colour and the instruction names it ("push toward
  the red marker"); there are 4 tasks (red, green, blue, purple). Every marker is darker than the table in all
  three channels, so "the marker is here" is the same simple feature whatever the colour, which a small model
  trained from scratch picks up quickly.
- (task_id, init_index) fixes the marker position: its quadrant is QUADRANTS[(task_id + init_index) % 4] and its
  offset from the centre is drawn uniformly in [0.3, 0.7] per axis (image half-width = 1) by a generator seeded
  with (seed, task_id, init_index). Held-out init indices therefore give continuous positions never trained on.
- Every action is one step. Only its first two dimensions matter: a step is a correct push when
  sign(a[0]) == sign(marker x) and sign(a[1]) == sign(marker y), with +x to the right and +y up in the image
  (sign 0 is never correct). A correct push moves the cursor a 1/pushes_to_goal part of the way to the marker;
  a wrong push leaves it where it is. The episode succeeds, and ends, at the `pushes_to_goal`-th correct push,
  and fails when `horizon` steps have passed. A chunk [N, K, 7] is executed action by action (K steps) and
  stops where the episode ends, as on LIBERO.
- With the defaults (horizon 4, pushes_to_goal 2) a policy whose signs are random succeeds with probability
  1 - P(Binomial(4, 1/4) <= 1) = 0.262, and a constant policy succeeds on exactly the instances of one quadrant:
  25 % over any 4 consecutive init indices of a task, and over all 4 tasks for any set of init indices.
  Solving it needs the image: the marker quadrant is all that decides the correct action.
- The wrist image is the same scene seen from the cursor at 2x zoom. proprio is [cursor x, cursor y, 0 x 6].

It runs in-process with numpy (no simulator, no workers), so `lost` is always False.
"""

from types import TracebackType

import numpy as np

from libero_env import EpisodeSpec, Observation, StepResult
from libero_env.processing import ACTION_DIM, POLICY_IMAGE_SIZE, PROPRIO_DIM
from libero_env.vector_env import check_not_stepping, env_indices

IMAGE_SIZE = POLICY_IMAGE_SIZE
TASK_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "green": (30, 140, 50),
    "blue": (30, 60, 200),
    "purple": (120, 40, 150),
}
QUADRANTS = np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)], dtype=np.float64)
"""Signs (x, y) of the marker position for (task_id + init_index) % 4."""
MARKER_OFFSET_RANGE = (0.3, 0.7)
"""Per-axis distance of the marker centre from the image centre (half-width 1): never near an axis."""
MARKER_RADIUS = 0.25
CURSOR_RADIUS = 0.07
WRIST_ZOOM = 2.0
TABLE_COLOUR = (235, 235, 235)
CURSOR_COLOUR = (0, 0, 0)

# World coordinates of the pixel centres of an unzoomed camera at the origin: x to the right, y up.
_PIXEL_X = (np.arange(IMAGE_SIZE) + 0.5 - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)
_PIXEL_Y = -_PIXEL_X
_TABLE_IMAGE = np.tile(np.array(TABLE_COLOUR, dtype=np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 1))
_TABLE_IMAGE.setflags(write=False)


def _draw_disk(image: np.ndarray, centre: np.ndarray, radius: float, colour: tuple[int, int, int],
               camera: np.ndarray, zoom: float) -> None:
    xs = camera[0] + _PIXEL_X / zoom - centre[0]
    ys = camera[1] + _PIXEL_Y / zoom - centre[1]
    # Only the disk's bounding box is tested: rendering stays cheap for hundreds of envs.
    cols, rows = np.nonzero(np.abs(xs) < radius)[0], np.nonzero(np.abs(ys) < radius)[0]
    if cols.size == 0 or rows.size == 0:
        return
    inside = ys[rows, None] ** 2 + xs[None, cols] ** 2 < radius**2
    image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1][inside] = colour


def _draw_scene(marker: np.ndarray, colour: tuple[int, int, int], cursor: np.ndarray, camera: np.ndarray,
                zoom: float) -> np.ndarray:
    image = _TABLE_IMAGE.copy()
    _draw_disk(image, marker, MARKER_RADIUS, colour, camera, zoom)
    _draw_disk(image, cursor, CURSOR_RADIUS, CURSOR_COLOUR, camera, zoom)
    return image


class ToyVectorEnv:
    """N toy episodes stepped together; same methods and results as LiberoVectorEnv (DESIGN.md)."""

    def __init__(self, num_envs: int, num_init_states: int = 50, horizon: int = 4, pushes_to_goal: int = 2,
                 seed: int = 0) -> None:
        """num_envs: episodes stepped together. num_init_states: init indices per task (LIBERO has 50).
        horizon: steps before an episode fails. pushes_to_goal: correct pushes that reach the marker.
        seed: fixes the marker positions of every (task_id, init_index)."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if num_init_states < 1:
            raise ValueError(f"num_init_states must be >= 1, got {num_init_states}")
        if not 1 <= pushes_to_goal <= horizon:
            raise ValueError(f"need 1 <= pushes_to_goal <= horizon, got pushes_to_goal={pushes_to_goal} "
                             f"horizon={horizon}")
        self.num_envs = num_envs
        self.lost_resets = 0  # no workers: a reset is never lost (LiberoVectorEnv.lost_resets)
        self.worker_seconds: dict[str, float] = {}  # no workers to time (LiberoVectorEnv.worker_seconds)
        self.num_init_states = num_init_states
        self.horizon = horizon
        self.pushes_to_goal = pushes_to_goal
        self.seed = seed
        self._colours = list(TASK_COLOURS)
        self._closed = False
        self._specs: list[EpisodeSpec | None] = [None] * num_envs
        self._markers = np.zeros((num_envs, 2))
        self._correct = np.zeros(num_envs, dtype=np.int64)
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._success = np.zeros(num_envs, dtype=bool)
        self._done = np.ones(num_envs, dtype=bool)
        self._starting = np.zeros(num_envs, dtype=bool)
        self._in_flight: dict[int, np.ndarray] = {}  # env -> its chunk [K, 7], sent by send_step()
        self._frames: list[list[np.ndarray]] = [[] for _ in range(num_envs)]

    @property
    def num_tasks(self) -> int:
        return len(self._colours)

    @property
    def max_steps(self) -> int:
        """Steps after which an episode ends as a failure (the suite horizon on LIBERO)."""
        return self.horizon

    def instruction(self, task_id: int) -> str:
        self._check_task(task_id)
        return f"push toward the {self._colours[task_id]} marker"

    def marker_position(self, task_id: int, init_index: int) -> np.ndarray:
        """float64 [2]: the marker centre (x right, y up; the image spans [-1, 1]) of one instance."""
        self._check_task(task_id)
        if not 0 <= init_index < self.num_init_states:
            raise ValueError(f"init_index {init_index} out of range: valid init indices are "
                             f"0..{self.num_init_states - 1}")
        rng = np.random.default_rng([self.seed, task_id, init_index])
        return QUADRANTS[(task_id + init_index) % 4] * rng.uniform(*MARKER_OFFSET_RANGE, size=2)

    def reset(self, specs: list[EpisodeSpec], envs: list[int] | None = None, wait: bool = True) -> Observation | None:
        """Starts `specs[i]` on env i; with `envs`, `specs[j]` on env `envs[j]` only, the others carry on. With
        wait=False the envs start on the next step() (reported in `started`), as LiberoVectorEnv's do."""
        self._check_open()
        if envs is None and len(specs) != self.num_envs:
            raise ValueError(f"reset needs one EpisodeSpec per env: got {len(specs)} for num_envs={self.num_envs}")
        envs = env_indices(envs, self.num_envs)
        if len(envs) != len(specs):
            raise ValueError(f"reset needs one EpisodeSpec per env it names: {len(envs)} envs, {len(specs)} specs")
        check_not_stepping(envs, self._in_flight)
        markers = [self.marker_position(spec.task_id, spec.init_index) for spec in specs]  # checks them all first
        for i, spec, marker in zip(envs, specs, markers):
            self._markers[i] = marker
            self._specs[i] = spec
            self._correct[i] = self._steps[i] = 0
            self._success[i] = False
            self._done[i] = not wait  # a starting env is not stepped until step() reports it started
            self._starting[i] = not wait
            self._frames[i] = []
        self._record_frames(np.isin(np.arange(self.num_envs), envs))
        return self._observe() if wait else None

    def step(self, actions: np.ndarray) -> StepResult:
        """actions: float [N, 7] or a chunk [N, K, 7]. Finished envs ignore theirs; any NaN/inf raises."""
        self.send_step(actions)
        return self.receive_step()

    def send_step(self, actions: np.ndarray, envs: list[int] | None = None) -> None:
        """step()'s first half, as LiberoVectorEnv's: actions [len(envs), 7] or [len(envs), K, 7] for `envs`
        (default all), executed by receive_step(envs)."""
        self._check_open()
        if all(spec is None for spec in self._specs):
            raise RuntimeError("step called before reset: call env.reset(specs) first")
        envs = env_indices(envs, self.num_envs)
        actions = np.asarray(actions)
        if actions.ndim == 2:
            actions = actions[:, None, :]
        if (actions.ndim != 3 or actions.shape[0] != len(envs) or actions.shape[2] != ACTION_DIM
                or actions.shape[1] < 1):
            raise ValueError(f"actions must have shape [N={len(envs)}, {ACTION_DIM}] or a chunk "
                             f"[N={len(envs)}, K, {ACTION_DIM}], got {np.shape(actions)}")
        if not np.issubdtype(actions.dtype, np.number):
            raise ValueError(f"actions must be numeric, got dtype {actions.dtype}")
        if not np.isfinite(actions).all():
            bad = sorted({envs[row] for row in np.nonzero(~np.isfinite(actions))[0].tolist()})
            raise ValueError(f"actions contain NaN or inf (envs {bad}); nothing was stepped")
        check_not_stepping(envs, self._in_flight)
        self._in_flight.update(zip(envs, actions))

    def receive_step(self, envs: list[int] | None = None) -> StepResult:
        """step()'s second half: executes the actions send_step sent to `envs` (default all); `started` names
        only envs among `envs`, as LiberoVectorEnv's."""
        self._check_open()
        envs = env_indices(envs, self.num_envs)
        chunks = {i: self._in_flight.pop(i) for i in envs if i in self._in_flight}
        sent = np.zeros(self.num_envs, dtype=bool)
        sent[list(chunks)] = True
        marker_signs = np.sign(self._markers)
        pushes = np.zeros((self.num_envs, 2))
        for chunk_step in range(max((len(chunk) for chunk in chunks.values()), default=0)):
            running = sent & ~self._done
            for i, chunk in chunks.items():
                running[i] &= chunk_step < len(chunk)
                pushes[i] = np.sign(chunk[min(chunk_step, len(chunk) - 1), :2])
            if not running.any():
                break
            correct = running & (pushes == marker_signs).all(axis=1)
            self._correct += correct
            self._steps += running
            self._success |= self._correct >= self.pushes_to_goal
            self._done |= self._success | (self._steps >= self.horizon)
            self._record_frames(running)
        started = self._starting & np.isin(np.arange(self.num_envs), envs)
        self._done[started] = self._starting[started] = False
        return StepResult(obs=self._observe(), done=self._done.copy(), success=self._success.copy(),
                          steps=self._steps.copy(), lost=np.zeros(self.num_envs, dtype=bool), started=started)

    def build_scenes(self, task_ids: list[int | None]) -> None:
        """LiberoVectorEnv's: here every task's scene is the same plane, so nothing is built; the tasks are
        checked as there."""
        self._check_open()
        if len(task_ids) != self.num_envs:
            raise ValueError(f"build_scenes needs a task (or None) per env: expected {self.num_envs}, got "
                             f"{len(task_ids)}")
        for task_id in task_ids:
            if task_id is not None:
                self._check_task(task_id)

    def frames(self, i: int) -> list[np.ndarray]:
        """Agentview frames uint8 [224, 224, 3] of env i's episode (reset + one per step); empty unless its
        EpisodeSpec asked for record_video."""
        if all(spec is None for spec in self._specs):
            raise RuntimeError("no episode yet: call env.reset(specs) first")
        if not 0 <= i < self.num_envs:
            raise ValueError(f"env index {i} out of range: valid indices are 0..{self.num_envs - 1}")
        return list(self._frames[i])

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "ToyVectorEnv":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _cursors(self) -> np.ndarray:
        progress = np.minimum(self._correct, self.pushes_to_goal) / self.pushes_to_goal
        return self._markers * progress[:, None]

    def _render(self, i: int, cursor: np.ndarray, wrist: bool) -> np.ndarray:
        if self._specs[i] is None:  # not reset yet: the empty table
            return _TABLE_IMAGE.copy()
        colour = TASK_COLOURS[self._colours[self._specs[i].task_id]]
        if wrist:
            return _draw_scene(self._markers[i], colour, cursor, camera=cursor, zoom=WRIST_ZOOM)
        return _draw_scene(self._markers[i], colour, cursor, camera=np.zeros(2), zoom=1.0)

    def _observe(self) -> Observation:
        cursors = self._cursors()
        agentview = np.stack([self._render(i, cursors[i], wrist=False) for i in range(self.num_envs)])
        wrist = np.stack([self._render(i, cursors[i], wrist=True) for i in range(self.num_envs)])
        proprio = np.zeros((self.num_envs, PROPRIO_DIM), dtype=np.float32)
        proprio[:, :2] = cursors
        return Observation(agentview=agentview, wrist=wrist, proprio=proprio,
                           instructions=["" if s is None else self.instruction(s.task_id) for s in self._specs])

    def _record_frames(self, moved: np.ndarray) -> None:
        cursors = self._cursors()
        for i, spec in enumerate(self._specs):
            if moved[i] and spec.record_video:
                self._frames[i].append(self._render(i, cursors[i], wrist=False))

    def _check_task(self, task_id: int) -> None:
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"unknown task_id {task_id}: valid task ids are 0..{self.num_tasks - 1} "
                             f"({', '.join(self._colours)})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the env is closed; create a new ToyVectorEnv")
