"""Golden runners: trajectory preprocessing (point files -> tracks -> blurred flow -> flow image)."""
from tora.config import TrajectoryConfig
from tora.trajectory import gaussian_kernel, load_motion_video

from . import GoldenCase, runner


@runner("traj_prep*")
def run_traj_prep(case: GoldenCase) -> dict:
    """Official sampling settings on the case's files, frames and size: the config defaults except the
    resampling rule, whose default keeps the whole path (the official rule truncates long files)."""
    p = case.params
    motion = load_motion_video([case.path(f) for f in p["files"]], p["num_frames"],
                               tuple(p["video_size_hw"]), TrajectoryConfig(resample="official"))
    return {"flow": motion.flow, "points": motion.tracks, "flow_image": motion.flow_image}


@runner("blur_kernel*")
def run_blur_kernel(case: GoldenCase) -> dict:
    """The official kernel = the configured default size and sigma."""
    cfg = TrajectoryConfig()
    return {"kernel": gaussian_kernel(cfg.blur_kernel_size, cfg.blur_sigma)}
