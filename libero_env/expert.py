"""Scripted pick-and-place expert for libero_spatial ("pick up the black bowl ... and place it on the plate").

The expert reads poses straight from the MuJoCo simulator of a LIBERO env (the object and target named by the
task's BDDL goal `(On <bowl> <plate>)`, the grip site, every other object's collision boxes) and drives the
OSC_POSE controller with 7-D actions in the dataset convention of OpenVLA's LIBERO data (REF 5.2):

    [dx, dy, dz, drx, dry, drz, gripper]    position / rotation deltas in the controller's normalised [-1, 1]
                                             (1 = 0.05 m, resp. 0.5 rad, per 20 Hz step); gripper 1 = open, 0 = close

`libero_env.to_env_actions` turns them into what the env consumes (-1 open, +1 close), as the reference eval does.

It is a phase machine: over the bowl -> descend -> close -> lift -> carry over the plate -> lower -> open ->
retreat, each phase aiming the controller at an explicit target. The bowl is wider than the open gripper, so it
is pinched by its rim: `plan_grasp` chooses where (direction, hence gripper yaw, and depth) from the collision
boxes of every other object and the arm's comfortable reach; `plan_corridor` raises the approach and the carry
until the gripper, and the bowl it carries, clear those boxes (the wooden cabinet stands next to, over or under
several bowls). A bowl that slips out of the fingers is picked up again.
"""

import enum
from dataclasses import dataclass, field

import numpy as np

from libero_env.processing import quat_to_axis_angle, to_env_actions
from libero_env.suites import start_episode

POSITION_SCALE = 0.05
"""Metres per unit of the OSC_POSE position action (robosuite's default `output_max`)."""
ROTATION_SCALE = 0.5
"""Radians per unit of the OSC_POSE rotation action."""
GRIPPER_OPEN, GRIPPER_CLOSED = 1.0, 0.0
"""Dataset-convention gripper values."""
GRIPPER_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
"""Grip-site orientation of the LIBERO start pose, straightened: fingers down, closing along world y."""
BOWL_RADIUS, BOWL_HEIGHT = 0.055, 0.053
"""Outer radius and height (m) of LIBERO's akita black bowl, measured from its collision boxes."""


@dataclass(frozen=True)
class ExpertConfig:
    """Geometry and gains of the scripted expert (defaults tuned on libero_spatial)."""

    grasp_offset: float = 0.042
    """Distance (m) from the bowl centre to the pinch point on its rim."""
    grasp_depths: tuple[float, ...] = (0.025, 0.018, 0.012)
    """How far (m) below the rim the grip site may go before closing, deepest (firmest) first."""
    hover: float = 0.08
    """Least clearance (m) of the grip site above the rim while moving over the bowl."""
    carry_height: float = 0.1
    """Least height (m) of the bowl origin above the plate origin while carrying."""
    lift: float = 0.06
    """Least lift (m) of the bowl above where it was picked, before carrying it sideways."""
    place_height: float = 0.015
    """Height (m) of the bowl origin above the plate origin at which it is released."""
    retreat: float = 0.08
    """How far (m) the gripper rises after releasing."""
    reach: tuple[float, float] = (0.45, 0.68)
    """Horizontal distances (m) from the robot base within which the grip site should pick and place the bowl."""
    yaw_cost: float = 0.01
    """Metres outside `reach` that one radian of gripper yaw is worth when choosing the pinch direction."""
    margin: float = 0.01
    """Clearance (m) kept between the gripper (and carried bowl) and other objects when planning."""
    tolerance: float = 0.01
    """Position error (m) at which a moving phase is complete."""
    turn_tolerance: float = 0.1
    """Orientation error (rad) under which the gripper may descend onto the bowl."""
    slip: float = 0.03
    """Displacement (m) of the bowl relative to the gripper after which it counts as dropped."""
    gripper_steps: int = 12
    """Steps spent closing or opening the gripper."""
    phase_timeout: int = 50
    """Steps after which a moving phase stops waiting for its tolerance."""


@dataclass(frozen=True)
class Boxes:
    """Oriented boxes in the world frame."""

    centers: np.ndarray
    """[K,3] box centres."""
    rotations: np.ndarray
    """[K,3,3] box axes as columns."""
    half_sizes: np.ndarray
    """[K,3] half extents along the box axes."""

    @staticmethod
    def concat(parts: list["Boxes"]) -> "Boxes":
        return Boxes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("centers", "rotations", "half_sizes")))


def overlapping(a: Boxes, b: Boxes) -> np.ndarray:
    """bool [Ka, Kb]: whether box i of `a` intersects box j of `b`. Pairs whose world-aligned bounds meet get the
    exact separating-axis test (15 axes)."""
    reach = [np.einsum("kij,kj->ki", np.abs(boxes.rotations), boxes.half_sizes) for boxes in (a, b)]
    result = np.all(np.abs(b.centers[None] - a.centers[:, None]) <= reach[0][:, None] + reach[1][None], axis=-1)
    i, j = np.nonzero(result)
    axes_a, axes_b = a.rotations[i].transpose(0, 2, 1), b.rotations[j].transpose(0, 2, 1)  # [P, 3 axes, 3 coords]
    crossed = np.cross(axes_a[:, :, None], axes_b[:, None, :]).reshape(-1, 9, 3)
    # Unnormalised axes are fine (a parallel pair gives a zero axis, which separates nothing): every term below
    # scales with the axis length.
    axes = np.concatenate([axes_a, axes_b, crossed], axis=1)  # [P, 15, 3]
    reach_a = np.einsum("pnk,pk->pn", np.abs(axes @ axes_a.transpose(0, 2, 1)), a.half_sizes[i])
    reach_b = np.einsum("pnk,pk->pn", np.abs(axes @ axes_b.transpose(0, 2, 1)), b.half_sizes[j])
    gap = np.abs(np.einsum("pnc,pc->pn", axes, b.centers[j] - a.centers[i]))
    result[i, j] = ~np.any(gap > reach_a + reach_b, axis=-1)
    return result


def rotation_vector(rotation: np.ndarray) -> np.ndarray:
    """Axis times angle (angle in [0, pi]) of a rotation matrix, through its unit quaternion (x, y, z, w).

    Shepperd's method: 4 q_i q_j are sums and differences of matrix entries; dividing the row of the largest
    component by 4 q_k keeps the division well away from zero.
    """
    m = rotation
    xy, xz, yz = m[0, 1] + m[1, 0], m[0, 2] + m[2, 0], m[1, 2] + m[2, 1]
    xw, yw, zw = m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]
    squares = np.array([1 + m[0, 0] - m[1, 1] - m[2, 2], 1 - m[0, 0] + m[1, 1] - m[2, 2],
                        1 - m[0, 0] - m[1, 1] + m[2, 2], 1 + m[0, 0] + m[1, 1] + m[2, 2]])  # 4 q_i^2
    products = np.array([[squares[0], xy, xz, xw], [xy, squares[1], yz, yw],
                         [xz, yz, squares[2], zw], [xw, yw, zw, squares[3]]])
    k = int(np.argmax(squares))
    quat = products[k] / (2 * np.sqrt(squares[k]))
    return quat_to_axis_angle(quat if quat[3] >= 0 else -quat)


def yaw_rotation(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# The open Panda gripper around its grip site, in the frame (across the fingers, along the fingers' axis, up):
# (centre, half extent) of each finger, the hand and the wrist, from robosuite's collision meshes.
GRIPPER_PARTS = (
    ((0.0, 0.034, 0.0165), (0.014, 0.016, 0.0285)),
    ((0.0, -0.034, 0.0165), (0.014, 0.016, 0.0285)),
    ((0.0, 0.0, 0.0775), (0.037, 0.106, 0.0475)),
    ((0.0, 0.0, 0.19), (0.055, 0.055, 0.065)),
)


def gripper_boxes(site: np.ndarray, yaw: float, rise: float = 0.0, margin: float = 0.0) -> Boxes:
    """Boxes of the open gripper with its grip site at `site`, turned by `yaw` from GRIPPER_DOWN; `rise` stretches
    them upwards by that many metres (the volume swept by a vertical move), `margin` inflates them."""
    frame = yaw_rotation(yaw)
    centers, halves = [], []
    for center, half in GRIPPER_PARTS:
        centers.append(site + frame @ np.asarray(center) + [0.0, 0.0, rise / 2])
        halves.append(np.asarray(half) + [margin, margin, margin + rise / 2])
    return Boxes(np.array(centers), np.broadcast_to(frame, (len(centers), 3, 3)).copy(), np.array(halves))


def bowl_box(bowl_pos: np.ndarray, margin: float = 0.0) -> Boxes:
    """Axis-aligned box around a bowl standing upright with its body origin at `bowl_pos`."""
    return Boxes(
        (bowl_pos + [0.0, 0.0, BOWL_HEIGHT / 2])[None],
        np.eye(3)[None],
        np.array([[BOWL_RADIUS + margin, BOWL_RADIUS + margin, BOWL_HEIGHT / 2 + margin]]),
    )


@dataclass(frozen=True)
class Scene:
    """What the expert reads from the simulator at one step (world frame, metres)."""

    eef_pos: np.ndarray
    """Grip-site position [3]."""
    eef_rot: np.ndarray
    """Grip-site orientation [3,3]."""
    bowl_pos: np.ndarray
    """Body origin of the bowl to pick [3] (its bottom centre)."""
    plate_pos: np.ndarray
    """Body origin of the plate [3]."""
    base_pos: np.ndarray
    """Robot base position [3]."""
    obstacles: Boxes
    """Collision boxes of every other object and fixture."""


def pick_place_targets(env) -> tuple[str, str]:
    """(object, target) of a LIBERO env's BDDL goal; the expert handles a single `(On object target)`."""
    goal = env.env.parsed_problem["goal_state"]
    if len(goal) != 1 or goal[0][0] != "on":
        raise ValueError(f"the scripted expert handles a single (On object target) goal, this task has {goal}")
    return goal[0][1], goal[0][2]


class SceneReader:
    """Reads `Scene`s from a LIBERO env (ControlEnv / OffScreenRenderEnv) whose goal is `(On bowl plate)`."""

    def __init__(self, env):
        inner = env.env
        self.sim = inner.sim
        model = self.sim.model
        self.bowl, self.plate = pick_place_targets(env)
        self.eef_site = inner.robots[0].eef_site_id
        self.base_body = model.body_name2id(inner.robots[0].robot_model.root_body)
        self.bowl_body = inner.obj_body_id[self.bowl]
        self.plate_body = inner.obj_body_id[self.plate]
        roots = {model.body_rootid[b] for name, b in inner.obj_body_id.items() if name != self.bowl}
        self.geoms = np.array([
            g for g in range(model.ngeom)
            if (model.geom_contype[g] or model.geom_conaffinity[g]) and model.body_rootid[model.geom_bodyid[g]] in roots
        ])
        is_box = model.geom_type[self.geoms] == 6  # mjGEOM_BOX; anything else gets its bounding cube
        self.half_sizes = np.where(is_box[:, None], model.geom_size[self.geoms], model.geom_rbound[self.geoms][:, None])

    def __call__(self) -> Scene:
        data = self.sim.data
        return Scene(
            eef_pos=np.array(data.site_xpos[self.eef_site]),
            eef_rot=np.array(data.site_xmat[self.eef_site]).reshape(3, 3),
            bowl_pos=np.array(data.body_xpos[self.bowl_body]),
            plate_pos=np.array(data.body_xpos[self.plate_body]),
            base_pos=np.array(data.body_xpos[self.base_body]),
            obstacles=Boxes(
                np.array(data.geom_xpos[self.geoms]),
                np.array(data.geom_xmat[self.geoms]).reshape(-1, 3, 3),
                self.half_sizes,
            ),
        )


@dataclass(frozen=True)
class Grasp:
    """Where the gripper pinches the bowl's rim."""

    direction: float
    """Angle (rad, world frame) from the bowl centre to the pinch point."""
    yaw: float
    """Gripper yaw relative to GRIPPER_DOWN that lines the fingers up with `direction`, in [-pi/2, pi/2)."""
    depth: float
    """How far (m) below the rim the grip site closes."""


def plan_grasp(scene: Scene, config: ExpertConfig, num_directions: int = 24) -> Grasp:
    """Where to pinch the rim. Candidates are tried clearance first (`config.margin`, then none), then depth
    (deepest first), then direction by cost; the first whose gripper, swept down from well above the rim, touches
    no other object wins (if none does, the one touching the fewest boxes). A direction's cost is how far its grip
    site strays outside `config.reach` (horizontal distance from the robot base) when picking and when placing,
    plus `config.yaw_cost` per radian of gripper turn: with the gripper pointing down, the Panda folds up too far
    near its base and stretches out at the far side of the plate, and in both cases drifts off target."""
    ranked = []
    for direction in np.linspace(-np.pi, np.pi, num_directions, endpoint=False):
        offset = config.grasp_offset * np.array([np.cos(direction), np.sin(direction), 0.0])
        reaches = [np.linalg.norm((p + offset - scene.base_pos)[:2]) for p in (scene.bowl_pos, scene.plate_pos)]
        strain = sum(max(0.0, config.reach[0] - r) + max(0.0, r - config.reach[1]) for r in reaches)
        yaw = direction % np.pi - np.pi / 2  # direction - pi/2, wrapped into [-pi/2, pi/2)
        ranked.append((strain + config.yaw_cost * abs(yaw), float(direction), float(yaw), offset))
    ranked.sort(key=lambda c: c[0])
    rim_z = scene.bowl_pos[2] + BOWL_HEIGHT
    candidates = [(Grasp(direction, yaw, depth), scene.bowl_pos + offset + [0.0, 0.0, BOWL_HEIGHT - depth])
                  for depth in config.grasp_depths for _, direction, yaw, offset in ranked]
    for margin in (config.margin, 0.0):
        for grasp, site in candidates:
            rise = rim_z + 2 * config.hover - site[2]
            if not overlapping(gripper_boxes(site, grasp.yaw, rise, margin), scene.obstacles).any():
                return grasp
    hits = [overlapping(gripper_boxes(site, g.yaw, rim_z + 2 * config.hover - site[2]), scene.obstacles).sum()
            for g, site in candidates]
    return candidates[int(np.argmin(hits))][0]


@dataclass(frozen=True)
class Corridor:
    """A straight horizontal path of the grip site and, at points along it, the lowest height that clears every
    other object."""

    start: np.ndarray
    """xy [2] where the path starts."""
    end: np.ndarray
    """xy [2] where it ends."""
    heights: np.ndarray
    """[K] clearing grip-site heights at K evenly spaced points from start to end."""

    def height(self, xy: np.ndarray, behind: float = 0.03, ahead: float = 0.1) -> float:
        """Highest clearing height from `behind` metres before to `ahead` metres after xy's place on the path."""
        direction = self.end - self.start
        length = float(np.linalg.norm(direction))
        place = float(np.clip(np.dot(xy - self.start, direction) / length, 0.0, length)) if length > 0 else 0.0
        positions = np.linspace(0.0, length, len(self.heights))
        return float(self.heights[(positions >= place - behind) & (positions <= place + ahead)].max())


def plan_corridor(
    scene: Scene, start: np.ndarray, end: np.ndarray, yaw: float, z_min: float, config: ExpertConfig,
    carried: np.ndarray | None = None, spacing: float = 0.015, z_step: float = 0.01, z_span: float = 0.3,
) -> Corridor:
    """Clearing heights (>= z_min, in z_step steps, at most z_min + z_span) along start -> end for the open gripper
    turned by `yaw` and, when `carried` is given, the bowl at that offset from the grip site."""
    count = max(2, int(np.linalg.norm(end[:2] - start[:2]) / spacing) + 1)
    points = np.linspace(start[:2], end[:2], count)
    heights = np.full(count, z_min + z_span)
    pending = np.arange(count)
    for z in np.arange(z_min, z_min + z_span, z_step):
        parts = []
        for xy in points[pending]:
            site = np.array([xy[0], xy[1], z])
            parts.append(gripper_boxes(site, yaw, margin=config.margin))
            if carried is not None:
                parts.append(bowl_box(site + carried, config.margin))
        blocked = overlapping(Boxes.concat(parts), scene.obstacles).any(axis=1).reshape(len(pending), -1).any(axis=1)
        heights[pending[~blocked]] = z
        pending = pending[blocked]
        if len(pending) == 0:
            break
    return Corridor(np.array(start[:2]), np.array(end[:2]), heights)


class Phase(enum.IntEnum):
    """Steps of the pick-and-place, in order."""

    OVER_BOWL = 0
    DESCEND = 1
    CLOSE = 2
    LIFT = 3
    OVER_PLATE = 4
    LOWER = 5
    OPEN = 6
    RETREAT = 7
    DONE = 8


@dataclass
class PickPlaceExpert:
    """Phase machine; call `act(scene)` once per env step until `done` (released the bowl and retreated)."""

    config: ExpertConfig = field(default_factory=ExpertConfig)
    """Geometry and gains."""
    phase: Phase = Phase.OVER_BOWL
    """Current step of the pick-and-place."""
    steps_in_phase: int = 0
    """Actions taken in the current phase (for the gripper phases and the timeout)."""
    grasp: Grasp | None = None
    """Where to pinch the rim, planned on entering OVER_BOWL."""
    approach_z: float = 0.0
    """Grip-site height at which to arrive over the bowl."""
    carry: Corridor | None = None
    """Path of the grip site from the grasp to over the plate, with the heights that clear other objects."""
    lift_z: float = 0.0
    """Least grip-site height before carrying the bowl sideways."""
    hold: np.ndarray | None = None
    """Bowl origin minus grip site right after closing; the bowl is dropped when this drifts by `config.slip`."""
    anchor: np.ndarray | None = None
    """Grip-site position held while the fingers close or open (the last DESCEND or LOWER target)."""

    @property
    def done(self) -> bool:
        return self.phase == Phase.DONE

    def act(self, scene: Scene) -> np.ndarray:
        """The next dataset-convention action, float32 [7]."""
        if self.phase in (Phase.LIFT, Phase.OVER_PLATE, Phase.LOWER) and self._dropped(scene):
            self._enter(Phase.OVER_BOWL)
        if self.phase == Phase.OVER_BOWL and self.steps_in_phase == 0:
            self._plan_approach(scene)
        cfg = self.config
        direction = np.array([np.cos(self.grasp.direction), np.sin(self.grasp.direction), 0.0])
        pinch = scene.bowl_pos + cfg.grasp_offset * direction
        turn = self._rotation_error(scene)
        # OSC_POSE aims at (current pose + action): a zero action holds nothing, so every phase aims at a target.
        gripper, target, reached = GRIPPER_OPEN, self.anchor, False
        if self.phase == Phase.OVER_BOWL:
            target = np.array([pinch[0], pinch[1], self.approach_z])
            reached = (np.linalg.norm(target - scene.eef_pos) < cfg.tolerance
                       and np.linalg.norm(turn) < cfg.turn_tolerance)
        elif self.phase == Phase.DESCEND:
            target = np.array([pinch[0], pinch[1], scene.bowl_pos[2] + BOWL_HEIGHT - self.grasp.depth])
            reached = np.linalg.norm(target - scene.eef_pos) < cfg.tolerance
            self.anchor = target
        elif self.phase == Phase.CLOSE:
            gripper, reached = GRIPPER_CLOSED, self.steps_in_phase + 1 >= cfg.gripper_steps
            if reached:
                self.hold = scene.bowl_pos - scene.eef_pos
                self._plan_carry(scene)
        elif self.phase == Phase.LIFT:
            gripper = GRIPPER_CLOSED
            target = np.array([self.anchor[0], self.anchor[1], max(self.carry.height(scene.eef_pos[:2]), self.lift_z)])
            reached = target[2] - scene.eef_pos[2] < cfg.tolerance
        elif self.phase == Phase.OVER_PLATE:  # steers the bowl itself, however it sits in the fingers
            gripper = GRIPPER_CLOSED
            bowl_to_plate = scene.plate_pos - scene.bowl_pos
            target = np.append((scene.eef_pos + bowl_to_plate)[:2], self.carry.height(scene.eef_pos[:2]))
            reached = np.linalg.norm(bowl_to_plate[:2]) < cfg.tolerance
        elif self.phase == Phase.LOWER:
            gripper = GRIPPER_CLOSED
            target = scene.eef_pos + scene.plate_pos + [0.0, 0.0, cfg.place_height] - scene.bowl_pos
            reached = np.linalg.norm(target - scene.eef_pos) < cfg.tolerance
            self.anchor = target
        elif self.phase == Phase.OPEN:
            reached = self.steps_in_phase + 1 >= cfg.gripper_steps
        elif self.phase == Phase.RETREAT:
            target = self.anchor + [0.0, 0.0, cfg.retreat]
            reached = target[2] - scene.eef_pos[2] < cfg.tolerance
        if self.phase != Phase.DONE:
            self._advance(reached)
        # Scaled down as a whole rather than clipped per axis, so that the gripper moves straight at the target.
        move = (target - scene.eef_pos) / POSITION_SCALE
        move /= max(1.0, np.abs(move).max())
        return np.clip(np.concatenate([move, turn / ROTATION_SCALE, [gripper]]), -1.0, 1.0).astype(np.float32)

    def _rotation_error(self, scene: Scene) -> np.ndarray:
        """Axis-angle (world frame) turning the grip site to the grasp's orientation: what OSC_POSE's delta means."""
        goal = yaw_rotation(self.grasp.yaw) @ GRIPPER_DOWN
        return rotation_vector(goal @ scene.eef_rot.T)

    def _plan_approach(self, scene: Scene) -> None:
        cfg = self.config
        self.grasp = plan_grasp(scene, cfg)
        direction = np.array([np.cos(self.grasp.direction), np.sin(self.grasp.direction), 0.0])
        pinch = scene.bowl_pos + cfg.grasp_offset * direction
        z_min = scene.bowl_pos[2] + BOWL_HEIGHT + cfg.hover
        self.approach_z = float(plan_corridor(scene, scene.eef_pos, pinch, self.grasp.yaw, z_min, cfg).heights.max())

    def _plan_carry(self, scene: Scene) -> None:
        cfg = self.config
        z_min = scene.plate_pos[2] + cfg.carry_height - self.hold[2]
        plate_site = scene.plate_pos - self.hold
        self.carry = plan_corridor(scene, scene.eef_pos, plate_site, self.grasp.yaw, z_min, cfg, carried=self.hold)
        self.lift_z = scene.eef_pos[2] + cfg.lift

    def _dropped(self, scene: Scene) -> bool:
        return np.linalg.norm(scene.bowl_pos - scene.eef_pos - self.hold) > self.config.slip

    def _enter(self, phase: Phase) -> None:
        self.phase, self.steps_in_phase = phase, 0

    def _advance(self, reached: bool) -> None:
        self.steps_in_phase += 1
        if reached or self.steps_in_phase >= self.config.phase_timeout:
            self._enter(Phase(self.phase + 1))


def make_env(bddl_file: str, cameras: bool, resolution: int = 256):
    """A LIBERO env for the expert: with `cameras`, the same OffScreenRenderEnv (agentview + wrist) as
    LiberoVectorEnv's workers; without, a ControlEnv that renders nothing (about 10x faster on CPU). Both keep their
    simulator across resets (suites.start_episode)."""
    from libero.libero.envs import OffScreenRenderEnv
    from libero.libero.envs.env_wrapper import ControlEnv

    if cameras:
        env = OffScreenRenderEnv(
            bddl_file_name=bddl_file, camera_heights=resolution, camera_widths=resolution,
            camera_names=["agentview", "robot0_eye_in_hand"], hard_reset=False,
        )
    else:
        env = ControlEnv(bddl_file_name=bddl_file, has_offscreen_renderer=False, use_camera_obs=False,
                         hard_reset=False)
    return env


@dataclass
class ExpertEpisode:
    """One expert rollout."""

    success: bool
    """The task's success predicate fired at some step (the reference protocol's criterion)."""
    settled: bool
    """The bowl is on the plate after the last step (released, at rest)."""
    actions: np.ndarray
    """float32 [T,7] dataset-convention actions, wait steps excluded."""
    observations: list[dict]
    """The env observation each action was chosen at (len T); empty unless asked for."""


def run_expert(env, init_state: np.ndarray, seed: int, max_steps: int, config: ExpertConfig = ExpertConfig(),
               keep_observations: bool = False) -> ExpertEpisode:
    """Starts an episode at `init_state` with the fixtures placed from `seed` as LiberoVectorEnv does
    (suites.start_episode), then runs the expert until it has retreated or `max_steps` actions have been taken."""
    obs = start_episode(env, init_state, seed)
    read_scene, expert = SceneReader(env), PickPlaceExpert(config)
    actions, observations, success = [], [], False
    while len(actions) < max_steps and not expert.done:
        action = expert.act(read_scene())
        if keep_observations:
            observations.append(obs)
        actions.append(action)
        obs, _, done, _ = env.step(to_env_actions(action).tolist())
        success = success or bool(done)
    actions = np.array(actions, dtype=np.float32).reshape(-1, 7)
    return ExpertEpisode(success, bool(env.check_success()), actions, observations)
