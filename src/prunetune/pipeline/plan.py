"""The recovery stages of a pipeline file, in the order they run.

A recover entry starts from a pruned model (``prune: <label>``) or, stacked, from the output of
another recover entry (``after: <its name>``): block-wise reconstruction, then ``full`` training
with distillation, say. The entry it names must recover with one method that writes a full model
folder (``full`` or ``blockwise``); an adapter (``lora``, ``masked_lora``) is refused. Each
stacked row is named after its whole chain ("wanda 50% + blockwise + bw + full") and keeps the
prune entry at its root, against which the report measures the gap won back.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunetune.errors import UsageError, require

# Recovery methods whose output is a full model folder another entry can start from.
BASE_METHODS = ("full", "blockwise")


@dataclass(frozen=True)
class RecoveryStep:
    """One recovery stage: entry ``index`` trained with ``method``."""

    index: int
    spec: object  # the RecoverySpec
    method: str
    label: str  # the row's name in the report, and the stage's
    prune: str  # the label of the prune entry at the root of the stack
    base: str | None  # the label of the recovery this one starts from; None: the pruned model

    @property
    def where(self) -> str:
        return f"config.recover[{self.index}]"


def plan_recoveries(specs: list, prune_labels: list[str]) -> list[RecoveryStep]:
    """Every (entry, method) as a :class:`RecoveryStep`, each after the stage it starts from.

    Raises:
        UsageError: ``prune`` naming no prune entry, ``after`` naming no (or two) recover entries,
            an entry with several methods or an adapter method, a chain that comes back to itself,
            or ``prune`` disagreeing with the stack's root.
    """
    names: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        if spec.name:
            names.setdefault(spec.name, []).append(index)
    done: dict[int, list[RecoveryStep]] = {}
    order: list[RecoveryStep] = []

    def resolve(index: int, chain: list[int]) -> list[RecoveryStep]:
        if index in done:
            return done[index]
        spec, where = specs[index], f"config.recover[{index}]"
        if index in chain:
            loop = " -> ".join(f"config.recover[{i}] ({specs[i].name})" for i in chain[chain.index(index):] + [index])
            raise UsageError(f"{where}.after: the entries start from each other in a loop ({loop}); a stack must "
                             "begin at a pruned model. Remove 'after' from one of them and give it 'prune'.")
        if spec.after is None:
            require(spec.prune is not None, f"{where}: give 'prune' (the label of a prune entry, e.g. 'wanda 50%') or "
                                            "'after' (the name of a recover entry whose output it continues from).")
            require(spec.prune in prune_labels, f"{where}.prune: {spec.prune!r} names no prune entry; accepted: "
                                                f"{', '.join(prune_labels) or 'none (config.prune is empty)'}.")
            root, base = spec.prune, None
        else:
            matches = names.get(spec.after, [])
            require(matches, f"{where}.after: {spec.after!r} names no recover entry; accepted: the 'name' of another "
                             f"recover entry ({', '.join(repr(n) for n in names) or 'none has a name'}).")
            require(len(matches) == 1, f"{where}.after: {spec.after!r} names {len(matches)} recover entries "
                                       f"({', '.join(f'config.recover[{i}]' for i in matches)}); give them distinct names.")
            base_spec = specs[matches[0]]
            require(len(base_spec.methods) == 1,
                    f"{where}.after: {spec.after!r} recovers with {len(base_spec.methods)} methods "
                    f"({', '.join(base_spec.methods)}); an entry starts from one model: give that entry one method.")
            require(base_spec.methods[0] in BASE_METHODS,
                    f"{where}.after: {spec.after!r} recovers with {base_spec.methods[0]}, which writes an adapter, not a "
                    f"model; an entry can start only from {' or '.join(BASE_METHODS)} (a full model folder). Stack on "
                    "a full or blockwise entry, or merge the adapter with prunetune merge and start from that model.")
            base_step = resolve(matches[0], chain + [index])[0]
            require(spec.prune is None or spec.prune == base_step.prune,
                    f"{where}.prune: {spec.prune!r}, but {spec.after!r} starts from {base_step.prune!r}; drop 'prune' "
                    "from a stacked entry (it continues from its base's pruned model).")
            root, base = base_step.prune, base_step.label
        for method in spec.methods:  # an override's bad key is refused naming this entry, before any label is made
            spec.for_method(method, where)
        steps = [RecoveryStep(index, spec, method, spec.label(method, base), root, base) for method in spec.methods]
        done[index] = steps
        order.extend(steps)
        return steps

    for index in range(len(specs)):
        resolve(index, [])
    return order
