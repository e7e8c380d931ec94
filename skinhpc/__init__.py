"""skinhpc: cross-validated HAM10000 skin-lesion classifiers on SLURM GPU clusters."""

from pathlib import Path

__version__ = "0.2.4"

# Label order is fixed and documented: index i of every probability vector is CLASSES[i].
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NUM_CLASSES = len(CLASSES)
CLASS_TO_LABEL = {name: i for i, name in enumerate(CLASSES)}

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# Presets and cluster profiles: the clone's top-level folders, or their copies inside an installed
# wheel (pyproject.toml maps configs/ and slurm/ to skinhpc/configs and skinhpc/slurm).
_IN_REPO = (REPO_DIR / "jobs" / "launch.py").is_file() and (REPO_DIR / "configs" / "default.yaml").is_file()
CONFIG_DIR = REPO_DIR / "configs" if _IN_REPO else PACKAGE_DIR / "configs"
PROFILE_DIR = REPO_DIR / "slurm" if _IN_REPO else PACKAGE_DIR / "slurm"
SAMPLE_DIR = PACKAGE_DIR / "sample"
SAMPLE_IMAGES = SAMPLE_DIR / "images"
SAMPLE_METADATA = SAMPLE_DIR / "HAM10000_metadata.csv"
