"""lm-eval's tasks: find them by name, load their data (offline when need be), say what is wrong.

:class:`TaskCatalog` wraps lm-eval's ``TaskManager``. Indexing lm-eval's ~15,000 built-in
task definitions takes 10-15 s on a 2-core machine, so when every requested name is a task
defined in ``--include_path`` only that folder is indexed (the user's definitions win over
lm-eval's of the same name either way). Loading a task reads its dataset: a Hub dataset
when the Hub cannot be reached is refused naming the task and the way to give it local data.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from prunetune.data.hub_sources import _offline_mode
from prunetune.data.local import file_digest
from prunetune.errors import UsageError
from prunetune.hub import offline_reason
from prunetune.zeroshot.scope import kept_rng_states, quiet_lm_eval
from prunetune.zeroshot.settings import INSTALL_HINT, LM_EVAL_TESTED

logger = logging.getLogger(__name__)

# datasets' builders for local files: a task whose dataset_path is one of these (or a folder) needs no Hub
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
# Entry kinds of lm-eval's index that are one task (not a group or a tag of tasks)
SINGLE_TASK_KINDS = {"TASK", "PY_TASK"}


def local_data_help(include_key: str) -> str:
    """How to give a task local data, naming the include-path key as the user gives it (flag or config key)."""
    return ("give the task local data instead: a YAML that includes lm-eval's definition and points dataset_path and "
            "dataset_kwargs.data_files at your copy of the data (prunetune.zeroshot.write_local_task writes it), in a "
            f"folder passed as {include_key}; docs/zeroshot.md lists the files each of the seven tasks needs")


def include_key(tasks_key: str) -> str:
    """``--tasks`` -> ``--include_path``; ``config.evaluation.tasks`` -> ``config.evaluation.include_path``."""
    return tasks_key.removesuffix("tasks") + "include_path"


def require_lm_eval():
    """The ``lm_eval`` module, or a UsageError saying how to install it."""
    try:
        import lm_eval
    except ImportError as err:
        raise UsageError(f"Zero-shot accuracy (--tasks, or tasks: in a pipeline file) runs lm-evaluation-harness, which "
                         f"is not installed ({err}); install it with {INSTALL_HINT}.") from err
    version = getattr(lm_eval, "__version__", "unknown")
    if version != LM_EVAL_TESTED:
        logger.warning("lm-eval %s is installed; prunetune's zero-shot code was written and tested against lm-eval %s "
                       "(%s installs it)", version, LM_EVAL_TESTED, INSTALL_HINT)
    return lm_eval


class TaskCatalog:
    """lm-eval's task index, built on first use; the caller keeps one per run to index once.

    Args:
        include_path: a folder of task YAMLs searched before (and overriding) lm-eval's own.
    """

    def __init__(self, include_path: str | None = None):
        self.include_path = str(Path(include_path).expanduser()) if include_path else None
        self._local = None  # TaskManager of include_path alone
        self._full = None  # TaskManager of lm-eval's tasks + include_path

    def _local_manager(self):
        if self._local is None:
            from lm_eval.tasks import TaskManager

            self._local = TaskManager(include_path=self.include_path, include_defaults=False)
        return self._local

    def full_manager(self):
        if self._full is None:
            require_lm_eval()
            from lm_eval.tasks import TaskManager

            logger.info("indexing lm-eval's task definitions (10-15 s on 2 CPU cores)")
            self._full = TaskManager(include_path=self.include_path)
        return self._full

    def manager(self, names: list[str]):
        """The smallest index that knows every name in ``names``."""
        require_lm_eval()
        if self.include_path:
            index = self._local_manager().task_index
            if all(name in index and index[name].kind.name in SINGLE_TASK_KINDS for name in names):
                return self._local_manager()
        return self.full_manager()

    def check_names(self, names: list[str], key: str = "--tasks"):
        """The manager that knows every name; a UsageError listing the unknown ones and their closest matches."""
        manager = self.manager(names)
        known = manager.task_index
        unknown = [name for name in names if name not in known]
        if not unknown:
            return manager
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, known.keys(), n=5, cutoff=0.6)
            parts.append(f"{name!r} (closest: {', '.join(close)})" if close else f"{name!r} (nothing close)")
        import lm_eval

        message = (f"{key}: unknown task{'s' if len(unknown) > 1 else ''} {'; '.join(parts)}. lm-eval "
                   f"{lm_eval.__version__} knows {len(known):,} task, group and tag names (`lm-eval ls tasks` lists "
                   "them); give some of those, or define your own task in a YAML file in a folder passed as "
                   f"{include_key(key)}.")
        unreadable = self.unreadable_files()
        if unreadable:
            shown = "; ".join(f"{path.name}: {why}" for path, why in unreadable[:3])
            message += (f" {len(unreadable)} YAML file(s) in {self.include_path} could not be read as task definitions "
                        f"({shown}).")
        raise UsageError(message)

    def unreadable_files(self) -> list[tuple[Path, str]]:
        """YAML files in include_path that lm-eval's index skipped (it logs them at debug level only), and why."""
        if not self.include_path:
            return []
        from lm_eval.tasks._yaml_loader import load_yaml

        problems = []
        for path in sorted(Path(self.include_path).rglob("*.yaml")):
            try:
                config = load_yaml(path, resolve_func=False)
                if not isinstance(config, dict) or not any(k in config for k in ("task", "group", "class")):
                    problems.append((path, "no 'task' or 'group' key"))
            except Exception as err:  # a YAML error, a missing include: reported, not raised
                problems.append((path, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"))
        return problems

    def load(self, names: list[str], key: str = "--tasks") -> dict:
        """lm-eval's task dict (``{"tasks", "groups", "group_map"}``) for ``names``, data loaded.

        Each name is loaded on its own so that a failure names it.

        Raises:
            UsageError: an unknown name; a task whose data cannot be loaded (offline: naming the task and
                how to give it local data); a task named twice (itself and through a group).
        """
        manager = self.check_names(names, key)
        tasks, groups, group_map, origin = {}, {}, {}, {}
        for name in names:
            loaded = _load_one(manager, name, key)
            for task_name in loaded["tasks"]:
                if task_name in origin:
                    raise UsageError(f"{key}: task {task_name} is asked for twice, by {origin[task_name]!r} and by "
                                     f"{name!r}; give it once.")
                origin[task_name] = name
            tasks.update(loaded["tasks"])
            groups.update(loaded.get("groups", {}))
            group_map.update(loaded.get("group_map", {}))
        return {"tasks": tasks, "groups": groups, "group_map": group_map}


def task_identity(include_path: str | None) -> str:
    """What identifies a set of task definitions for a stage key: lm-eval's version (its own tasks come with it)
    and, with ``include_path``, the content of every file in that folder and of the data files its YAMLs name.

    Hub datasets are identified by name, as prunetune's other Hub data sources are.
    """
    import hashlib

    lm_eval = require_lm_eval()
    identity = f"lm-eval {lm_eval.__version__}"
    if not include_path:
        return identity
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(include_path).expanduser().resolve()
    files = {path.resolve() for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    for definition in sorted(folder.rglob("*.yaml")):
        try:
            config = load_yaml(definition, resolve_func=False)
        except Exception as err:  # hashed as a file all the same; check_names reports it
            logger.debug("task identity: %s not read as YAML (%s)", definition, err)
            continue
        kwargs = (config.get("dataset_kwargs") or {}) if isinstance(config, dict) else {}
        data_files = kwargs.get("data_files") or {} if isinstance(kwargs, dict) else {}
        named = data_files.values() if isinstance(data_files, dict) else [data_files]
        for entry in named:  # a file, or a list of files, per split
            for each in [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else []:
                if isinstance(each, str) and Path(each).expanduser().is_file():
                    files.add(Path(each).expanduser().resolve())
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\0{file_digest(path)}\n".encode())
    return f"{identity}; {len(files)} task files, sha256 {digest.hexdigest()[:16]}"


def _may_need_hub(entry) -> bool:
    """Whether loading this index entry may fetch from the Hub (a group or tag: its tasks may)."""
    config = entry.cfg or {}
    if entry.kind.name not in SINGLE_TASK_KINDS or not isinstance(config.get("dataset_path"), str):
        return True
    path = config["dataset_path"]
    return path not in LOCAL_BUILDERS and not Path(path).expanduser().exists()


def dataset_of(config: dict) -> str:
    """Where a task's examples come from, in words: ``aps/super_glue (boolq)``, ``json: /data/boolq.jsonl``."""
    path, name = config.get("dataset_path"), config.get("dataset_name")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if path in LOCAL_BUILDERS and files:
        listed = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
        shown = ", ".join(str(v) for v in listed)
        return f"{path}: {shown}"
    return f"{path} ({name})" if name else str(path)


def _load_one(manager, name: str, key: str) -> dict:
    entry = manager.task_index[name]
    reason = offline_reason() if _may_need_hub(entry) else None
    try:
        with _offline_mode(reason is not None), quiet_lm_eval(), kept_rng_states():  # offline: the cache, no retries
            return manager.load([name])
    except Exception as err:  # lm-eval and datasets fail in many types: a missing file, a YAML error, no network
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        data = dataset_of(entry.cfg or {}) if entry.cfg else "its tasks' datasets"
        if reason is not None:
            raise UsageError(f"{key}: task {name!r} reads its examples ({data}) from the Hugging Face Hub, which cannot "
                             f"be used here ({reason}), and they are not in the local datasets cache. To run it, "
                             f"{local_data_help(include_key(key))}. Or fill the cache on a machine with network "
                             "(HF_HOME) and copy it here.") from err
        raise UsageError(f"{key}: lm-eval could not load task {name!r} (data: {data}): {type(err).__name__}: {first}. "
                         "Check its definition and data files; for a Hub dataset without network, "
                         f"{local_data_help(include_key(key))}.") from err


def check_generation(tasks: dict, model, key: str = "--tasks") -> None:
    """Refuse generation tasks (output_type generate_until) for a model that cannot generate.

    lm-eval scores those tasks on text produced by ``model.generate``, which needs a generation
    config (its decoding defaults and end-of-sequence ids); multiple-choice tasks only score
    the likelihood of given answers and need none.
    """
    generating = [name for name, task in tasks.items() if task.get_config("output_type") == "generate_until"]
    if not generating:
        return
    config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is not None and (can_generate is None or can_generate()):
        return
    raise UsageError(f"{key}: {', '.join(generating)} {'is a generation task' if len(generating) == 1 else 'are generation tasks'} "
                     "(output_type generate_until): lm-eval scores the text the model generates, and this model has no "
                     "generation config (generation_config.json: decoding defaults, end-of-sequence id), so it cannot "
                     "generate. Add one to the model folder (transformers.GenerationConfig(eos_token_id=...)."
                     "save_pretrained(folder)), or choose multiple-choice tasks (output_type multiple_choice, as the "
                     "seven of Wanda's Table 2), which score answers by likelihood.")
