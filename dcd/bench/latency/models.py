"""The models a benchmark run times: a teacher (by family, through the registry) and its two students."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from torch import nn

from .settings import BenchError, Settings

__all__ = ["DUAL_BASE_CONFIG", "Models", "build_models", "load_student_checked", "load_teacher", "param_count",
           "resolve_student_checkpoints"]


@dataclass
class Models:
    """One teacher and its students, with a line describing each (size, origin of the weights)."""

    family: str
    teacher: nn.Module
    fusion: nn.Module
    dual: nn.Module
    notes: Dict[str, str] = field(default_factory=dict)


#: the dual student paired with a teacher that has no unimodal towers to copy (ViLT) in a --quick run
QUICK_DUAL = "dual-bert32x1-vit32x1"
#: the dual student paired with a teacher that has no unimodal towers to copy (ViLT), at base size:
#: ViT-B/32 at 384 px (ViLT's own patch embedding size) + a BERT-base text encoder, random weights
DUAL_BASE_CONFIG = dict(
    timm_model="vit_base_patch32_384", timm_kwargs={"img_size": 384}, image_size=384,
    text_model=None, text_config={"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
                                  "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522},
    text_pooling="cls", embed_dim=256,
)


def build_models(family: str, settings: Settings, teacher_checkpoint: Optional[str],
                 student_checkpoints: Dict[str, Path]) -> Models:
    """The teacher (base preset, --quick: the embedded teacher's preset, or --teacher-checkpoint), its fusion student and a dual student.

    Every model comes through the registries and the teacher interface (:mod:`teachers.base`): no teacher
    family is named here, so a registered third family is benchmarked like METER and ViLT.
    """
    import students
    import teachers
    from students import DualEncoder, DualEncoderConfig, FusionStudent

    from dcd.teacher_training import EMBEDDED_TEACHERS  # --quick: the embedded teacher's size

    size = EMBEDDED_TEACHERS.get(family, {}).get("preset", "base") if settings.quick else "base"
    notes: Dict[str, str] = {}
    if teacher_checkpoint:
        teacher = load_teacher(family, teacher_checkpoint)
        notes["teacher"] = f"{family} from {teacher_checkpoint}"
    else:
        teacher = teachers.create_model(family, preset=size)
        notes["teacher"] = f"{family} preset {size!r}, random weights"
    teacher = getattr(teacher, "model", teacher)  # the raw architecture (a Teacher wrapper hides score_pairs_naive)

    if "fusion" in student_checkpoints:
        fusion = load_student_checked(student_checkpoints["fusion"], "fusion", family)
        notes["fusion"] = f"fusion student from {student_checkpoints['fusion']} (layers {list(fusion.layers)})"
    else:
        fusion = FusionStudent.from_teacher(teacher)
        notes["fusion"] = f"FusionStudent.from_teacher(teacher), layers {list(fusion.layers)} of the teacher's"

    if "dual" in student_checkpoints:
        dual = load_student_checked(student_checkpoints["dual"], "dual", family)
        notes["dual"] = f"dual student from {student_checkpoints['dual']}"
    else:
        try:
            dual = DualEncoder.from_teacher(teacher)
            notes["dual"] = "DualEncoder.from_teacher(teacher): the teacher's unimodal towers + projections"
        except NotImplementedError:  # a single-stream teacher (ViLT): no towers to copy
            if settings.quick:
                dual = students.create_student(QUICK_DUAL, pretrained=False)
                notes["dual"] = f"{QUICK_DUAL} preset, random weights"
            else:
                dual = DualEncoder(DualEncoderConfig(**DUAL_BASE_CONFIG), pretrained=False)
                notes["dual"] = "ViT-B/32 @384 + BERT-base text tower (12 layers, 768 wide), embed 256, random weights"

    models = Models(family, *(m.to(settings.device).eval() for m in (teacher, fusion, dual)), notes=notes)
    for role in ("teacher", "fusion", "dual"):
        notes[role] += f"; {param_count(getattr(models, role)) / 1e6:.1f} M parameters"
    return models


def load_teacher(family: str, checkpoint: str) -> nn.Module:
    """``create_teacher(family, checkpoint)``, with an error naming the file when its saved config names
    another family (``teachers.saved_family``; a file without one is left to the family's loader)."""
    import teachers

    found = teachers.saved_family(checkpoint)
    if found is not None and found != family:
        raise BenchError(f"--teacher-checkpoint {checkpoint} is a {found} checkpoint (its config.json says so), "
                         f"not a {family} one (use --teacher {found})")
    try:
        return teachers.create_teacher(family, checkpoint=checkpoint)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BenchError(f"could not load --teacher-checkpoint {checkpoint} as a {family} teacher: {err}") from None


def load_student_checked(directory: Path, family: str, teacher_family: str) -> nn.Module:
    import students

    try:
        model = students.load_student(directory)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BenchError(f"could not load --student-checkpoint {directory}: {err}") from None
    if getattr(model, "family", None) != family:
        raise BenchError(f"--student-checkpoint {directory} holds a {getattr(model, 'family', '?')!r} student, not a {family!r} one")
    if family == "fusion" and model.teacher_family != teacher_family:
        raise BenchError(f"--student-checkpoint {directory} is a fusion student of {model.teacher_family!r}, "
                         f"not of the {teacher_family!r} teacher")
    return model


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _student_dirs(path: Path) -> List[Path]:
    """``path`` itself when it holds a config.json, else its sub-directories that do (a run directory)."""
    if not path.is_dir():
        raise BenchError(f"--student-checkpoint {path}: no such directory")
    if (path / "config.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/config.json"))
    if not found:
        raise BenchError(f"--student-checkpoint {path}: neither it nor a sub-directory holds a saved student (config.json)")
    return found


def resolve_student_checkpoints(paths: Sequence[str], families: Sequence[str]) -> Dict[str, Dict[str, Path]]:
    """{teacher family: {"dual": dir, "fusion": dir}} from the --student-checkpoint arguments.

    A dual student serves every teacher; a fusion student only its own teacher family
    (config.json "teacher_family"). A wrong family is an error that names the directory.
    """
    from students import hub

    chosen: Dict[str, Dict[str, Path]] = {f: {} for f in families}
    for arg in paths:
        for directory in _student_dirs(Path(arg)):
            try:
                config = hub.read_config(directory)
            except (OSError, ValueError, KeyError) as err:
                raise BenchError(f"--student-checkpoint {directory}: {err}") from None
            family = config["family"]
            if family == "dual":
                targets = list(families)
            elif family == "fusion":
                teacher_family = config.get("teacher_family")
                if teacher_family not in families:
                    raise BenchError(
                        f"--student-checkpoint {directory} is a fusion student of a {teacher_family!r} teacher "
                        f"(config.json teacher_family), but the benchmark runs --teacher {' '.join(families)}"
                    )
                targets = [teacher_family]
            else:
                raise BenchError(
                    f"--student-checkpoint {directory} holds a {family!r} student (config.json family); "
                    "expected a 'dual' or 'fusion' student"
                )
            for target in targets:
                if family in chosen[target]:
                    raise BenchError(f"two {family} student checkpoints for {target}: {chosen[target][family]} and {directory}")
                chosen[target][family] = directory
    return chosen
