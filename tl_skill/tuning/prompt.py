"""Soft prompts, verbalizers and prompt placement (method §1).

Placement: for a causal LM the prompt goes *after* the input
(`input + prompt`, prediction at the last prompt position), so every prompt
position can attend to the input; for a masked LM the layout is
`[CLS] [MASK] prompt input [SEP]`, prediction at the mask.

The soft prompt is applied as a hook on the embedding output (`embed.hook_out` on a bridge,
`hook_embed` on a HookedTransformer): the token ids hold
placeholders at the prompt positions and the hook writes the prompt vectors
over their embeddings. Everything else in TransformerLens (`run_with_cache`,
`hooks`, the recorders here) therefore sees the prompted model, and leaving
the context leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import column, label_array
from tl_skill.errors import PromptError, VerbalizerError
from tl_skill.files import FileFormatError, atomic_tensors, read_tensors
from tl_skill.models import model_spec


class Verbalizer:
    """Label words -> token ids; class score = logit of the word's first token."""

    def __init__(self, tokenizer, label_words: Sequence[str]):
        if len(label_words) < 2:
            raise VerbalizerError(f"a verbalizer needs at least two label words, got {list(label_words)}")
        self.label_words = tuple(label_words)
        ids = []
        self.tokens_per_word: tuple[int, ...] = ()
        for word in self.label_words:
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not toks:
                raise VerbalizerError(f"label word {word!r} tokenizes to nothing")
            ids.append(int(toks[0]))
            self.tokens_per_word += (len(toks),)
        seen: dict[int, str] = {}
        for word, tid in zip(self.label_words, ids):
            if tid in seen:
                tok = tokenizer.convert_ids_to_tokens(tid)
                raise VerbalizerError(
                    f"label words {seen[tid]!r} and {word!r} start with the same token {tok!r} "
                    f"(id {tid}); choose words whose first tokens differ"
                )
            seen[tid] = word
        self.token_ids = torch.tensor(ids, dtype=torch.long)

    def class_logits(
        self,
        logits: Float[torch.Tensor, "batch pos vocab"],
        pred_pos: Int[torch.Tensor, "batch"],  # noqa: F821 - a jaxtyping shape, not a name
    ) -> Float[torch.Tensor, "batch n_classes"]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        at_pred = logits[rows, pred_pos.to(logits.device)]
        return at_pred[:, self.token_ids.to(logits.device)]

    @property
    def multi_token_words(self) -> list[str]:
        """Label words of more than one token: each class is scored by its word's first token (method)."""
        return [w for w, n in zip(self.label_words, self.tokens_per_word) if n > 1]

    def to_dict(self) -> dict:
        return {
            "label_words": list(self.label_words),
            "token_ids": self.token_ids.tolist(),
            "tokens_per_word": list(self.tokens_per_word),
            "scored_by": "first token",
        }


@dataclass
class Batch:
    """One padded batch in a prompt layout."""

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    pred_pos: Int[torch.Tensor, "batch"]  # noqa: F821 - a jaxtyping shape, not a name
    prompt_start: Int[torch.Tensor, "batch"]  # noqa: F821 - a jaxtyping shape, not a name
    prompt_length: int
    labels: Int[torch.Tensor, "batch"] | None = None  # noqa: F821 - a jaxtyping shape, not a name
    input_start: Int[torch.Tensor, "batch"] | None = None  # noqa: F821 - first input token
    input_end: Int[torch.Tensor, "batch"] | None = None  # noqa: F821 - one past the last input token
    # Global number of the first row in the split's fixed example order (`iterate_batches`),
    # the same whatever the batch size or number of processes: noise draws are keyed by it.
    first_example: int = 0

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.pred_pos.to(device),
            self.prompt_start.to(device),
            self.prompt_length,
            move(self.labels),
            move(self.input_start),
            move(self.input_end),
            self.first_example,
        )

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def prompt_positions(self) -> Int[torch.Tensor, "batch prompt"]:
        return self.prompt_start[:, None] + torch.arange(self.prompt_length, device=self.prompt_start.device)

    @property
    def uniform_prompt(self) -> bool:
        return bool((self.prompt_start == self.prompt_start[0]).all())


class NumberedHook:
    """A forward hook whose effect depends on which examples a batch holds (noise drawn per example).

    Whoever runs batches calls `start_batch(batch.first_example)` before each batch (`evaluate`,
    the prefix cache before each of its passes), so the hook can number the batch's rows by their
    global position in the split: the same draws whatever the batch size or number of processes.
    """

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor | None], start_batch: Callable[[int], None]):
        self.fn = fn
        self._start = start_batch

    def __call__(self, act: torch.Tensor, hook: Any) -> torch.Tensor | None:
        return self.fn(act, hook)

    def start_batch(self, first_example: int) -> None:
        self._start(first_example)

    def __repr__(self) -> str:
        return f"NumberedHook({getattr(self.fn, '__qualname__', self.fn)!r})"


def batch_starters(hooks: Sequence[tuple[str, Callable]]) -> list[Callable[[int], None]]:
    """The `start_batch` of every `NumberedHook` among `(name, hook)` pairs, in order."""
    return [fn.start_batch for _, fn in hooks if isinstance(fn, NumberedHook)]


class Layout:
    """Where input, prompt, padding and the prediction position go, for one model family.

    Causal rows are `[specials] input prompt`, padded left by default: `specials` are `prefix_ids`,
    by default what the tokenizer puts before a text (`compat.special_prefix`; Gemma's `<bos>`).
    Masked rows are `[CLS] [MASK] prompt input [SEP]`, padded right.
    """

    def __init__(
        self,
        tokenizer,
        family: str,
        prompt_length: int,
        max_input_tokens: int = 128,
        padding_side: str | None = None,
        prefix_ids: Sequence[int] | None = None,
    ):
        if family not in ("causal", "masked"):
            raise PromptError(f"unknown model family {family!r}")
        if prompt_length < 0:
            raise PromptError(f"prompt length must be >= 0, got {prompt_length}")
        self.tokenizer = tokenizer
        self.family = family
        self.prompt_length = prompt_length
        self.max_input_tokens = max_input_tokens
        self.padding_side = padding_side or ("left" if family == "causal" else "right")
        if self.padding_side not in ("left", "right"):
            raise PromptError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        if family == "masked":
            if tokenizer.mask_token_id is None:
                raise PromptError("a masked-LM layout needs a tokenizer with a mask token")
            cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            self.head = [int(cls)] if cls is not None else []
            self.sep = [int(sep)] if sep is not None else []
            self.mask_pos = len(self.head)
            self.offset: int | None = self.mask_pos + 1
        else:  # what the tokenizer puts first (Gemma's <bos>); nothing for SmolLM2 or GPT-2
            head = compat.special_prefix(tokenizer) if prefix_ids is None else [int(i) for i in prefix_ids]
            self.head, self.sep, self.offset = head, [], None

    @property
    def max_length(self) -> int:
        """The longest row this layout can make: input (at most `max_input_tokens`), prompt and specials."""
        extra = len(self.head) + 1 + 2 * len(self.sep) if self.family == "masked" else len(self.head)
        return self.max_input_tokens + self.prompt_length + extra

    def check_fits(self, n_ctx: int | None) -> None:
        """Refuse a prompt and input length that would overrun the model's positions, before any work."""
        if n_ctx is not None and self.max_length > n_ctx:
            raise PromptError(
                f"prompt length {self.prompt_length} + max input tokens {self.max_input_tokens}"
                + (" + special tokens" if self.family == "masked" else "")
                + f" = {self.max_length} positions, more than the model's context of {n_ctx}: "
                "shorten --prompt-length or --max-input-tokens"
            )

    def tokenize(self, texts: Sequence[str], text_b: Sequence[str] | None = None) -> list[list[int]]:
        """Token ids of each example's input part, truncated to `max_input_tokens`."""
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if text_b is None:
            return [ids[: self.max_input_tokens] for ids in enc]
        enc_b = self.tokenizer([" " + t for t in text_b], add_special_tokens=False)["input_ids"]
        half = self.max_input_tokens // 2
        out = []
        for a, b in zip(enc, enc_b):
            b = b[: max(half, self.max_input_tokens - len(a))]
            a = a[: self.max_input_tokens - len(b)]
            out.append(a + (self.sep if self.family == "masked" else []) + b)
        return out

    def collate(self, token_lists: Sequence[list[int]], labels: Sequence[int] | np.ndarray | None = None) -> Batch:
        P = self.prompt_length
        rows, starts, preds, in_start, in_end = [], [], [], [], []
        for ids in token_lists:
            if self.family == "causal":
                if not ids and P == 0 and not self.head:
                    raise PromptError("an empty input with no prompt has no prediction position")
                row = self.head + list(ids) + [self.pad_id] * P
                starts.append(len(self.head) + len(ids))
                preds.append(len(row) - 1)
                in_start.append(len(self.head))
            else:
                offset = int(self.mask_pos) + 1
                row = self.head + [self.tokenizer.mask_token_id] + [self.pad_id] * P + list(ids) + self.sep
                starts.append(offset)
                preds.append(self.mask_pos)
                in_start.append(offset + P)
            in_end.append(in_start[-1] + len(ids))
            rows.append(row)
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, row in enumerate(rows):
            shift = T - len(row) if self.padding_side == "left" else 0
            input_ids[i, shift : shift + len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, shift : shift + len(row)] = 1
            starts[i] += shift
            preds[i] += shift
            in_start[i] += shift
            in_end[i] += shift
        return Batch(
            input_ids,
            mask,
            torch.tensor(preds),
            torch.tensor(starts),
            P,
            None if labels is None else torch.as_tensor(np.array(labels), dtype=torch.long),
            torch.tensor(in_start),
            torch.tensor(in_end),
        )

    def encode(self, texts: Sequence[str], labels=None, text_b=None) -> Batch:
        return self.collate(self.tokenize(texts, text_b), labels)


def layout_for(
    model: HookedRootModule, prompt_length: int, max_input_tokens: int = 128, padding_side: str | None = None
) -> Layout:
    return Layout(
        model.tokenizer,
        model_spec(model).family,
        prompt_length,
        max_input_tokens,
        padding_side,
        prefix_ids=compat.model_prefix_ids(model),
    )


def iterate_batches(
    layout: Layout, task, split: str, batch_size: int, sort: bool = True, shard: bool = False
) -> Iterator[tuple[np.ndarray, Batch]]:
    """Yield (indices, Batch) over a split of a `Task`, sorted by length so padding stays small.

    The order is fixed by the split alone (a stable sort by token count), whatever the
    batch size; `Batch.first_example` is the batch's first global position in it. With
    `shard` under torch.distributed, only this process's batches (every world-th one):
    each batch is the one a single process would see.
    """
    if batch_size < 1:
        raise PromptError(f"batch size must be >= 1, got {batch_size}")
    ds = task[split]
    tb = column(ds, "text_b") if "text_b" in ds.column_names else None
    tokens = layout.tokenize(column(ds, "text"), tb)
    labels = label_array(ds)
    order = np.argsort([len(t) for t in tokens], kind="stable") if sort else np.arange(len(tokens))
    starts = range(0, len(order), batch_size)
    for start in distributed.shard(starts) if shard else starts:
        idx = order[start : start + batch_size]
        batch = layout.collate([tokens[i] for i in idx], labels[idx])
        batch.first_example = int(start)
        yield idx, batch


def train_batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Indices of training batch `step`: a stream of per-epoch permutations, so resume is exact."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out)


class SoftPrompt(nn.Module):
    """P trainable vectors of width d_model, written over the prompt positions' embeddings."""

    def __init__(self, vectors: Float[torch.Tensor, "prompt d_model"]):
        super().__init__()
        if vectors.ndim != 2 or vectors.shape[0] < 1:
            raise PromptError(f"a soft prompt is [P, d_model] with P >= 1, got shape {tuple(vectors.shape)}")
        if not torch.isfinite(vectors).all():
            raise PromptError("soft prompt contains NaN or inf")
        self.vectors = nn.Parameter(vectors.detach().clone().float())
        self._batch: Batch | None = None

    @property
    def length(self) -> int:
        return int(self.vectors.shape[0])

    @classmethod
    def from_vocab(cls, model: HookedRootModule, length: int, seed: int = 0, top_tokens: int = 5000) -> SoftPrompt:
        """Initialise from the embeddings of `length` real tokens sampled with `seed`.

        Tokens are drawn from ids [10, top_tokens): BPE vocabularies put their
        most frequent merges early, and an all-zero start gives NaN gradients. The vectors are
        what the embedding hook sees for those tokens, so a family that scales its embeddings
        (Gemma: by sqrt(d_model)) starts at the scale of real tokens.
        """
        W_E = _embedding_matrix(model)
        hi = min(top_tokens, W_E.shape[0])
        special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
        pool = [i for i in range(min(10, hi - 1), hi) if i not in special]
        rng = np.random.RandomState(seed)
        ids = rng.choice(pool, size=length, replace=len(pool) < length)
        return cls(_token_embeddings(model, ids))

    @classmethod
    def from_text(cls, model: HookedRootModule, text: str, length: int | None = None) -> SoftPrompt:
        """Initialise from the embeddings of `text`'s tokens (cycled to `length`)."""
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PromptError(f"prompt text {text!r} has no tokens")
        if length is not None:
            ids = [ids[i % len(ids)] for i in range(length)]
        return cls(_token_embeddings(model, ids))

    def hook(self, embed: Float[torch.Tensor, "batch pos d_model"], hook) -> torch.Tensor:
        P = self.length
        prompt = self.vectors.to(device=embed.device, dtype=embed.dtype)
        B = embed.shape[0]
        batch = self._batch
        if batch is not None and not batch.uniform_prompt:
            positions = batch.prompt_positions().to(embed.device)
            out = embed.clone()
            out[torch.arange(B, device=embed.device)[:, None], positions] = prompt.expand(B, -1, -1)
            return out
        if batch is not None:
            start = int(batch.prompt_start[0])
        else:
            start = embed.shape[1] - P if self._family == "causal" else int(self._offset or 0)
            self._check_room(embed, start)
        return torch.cat([embed[:, :start], prompt.expand(B, -1, -1), embed[:, start + P :]], dim=1)

    def _check_room(self, embed: torch.Tensor, start: int) -> None:
        """Without a `Batch`, the prompt positions must exist and hold the layout's placeholder token.

        Otherwise the prompt would silently overwrite real input tokens (or the
        model would get more positions than it was given).
        """
        P, T = self.length, embed.shape[1]
        if start < 0 or start + P > T:
            raise PromptError(
                f"the input has {T} position(s), too few for a prompt of {P} at position {max(start, 0)}: "
                "build the input with Layout.encode (layout_for(model, prompt.length)), which makes room"
            )
        placeholder = self._placeholder.to(device=embed.device, dtype=embed.dtype)
        if not torch.equal(embed[:, start : start + P], placeholder.expand(embed.shape[0], P, -1)):
            raise PromptError(
                f"positions {start}-{start + P - 1} of the input are not prompt placeholders (token id "
                f"{self._placeholder_id}): the prompt would overwrite real tokens. Build the input with "
                "Layout.encode (layout_for(model, prompt.length)), or pass the Batch to applied(model, batch)"
            )

    @contextlib.contextmanager
    def applied(self, model: HookedRootModule, batch: Batch | None = None) -> Iterator[SoftPrompt]:
        """Context in which `model` runs with this prompt written over the prompt positions.

        Without `batch`, the default layout's positions are used (the last P
        positions for a causal LM with left padding; right after the mask for a
        masked LM). Pass `batch` for right-padded causal batches.
        """
        spec = model_spec(model)
        if spec.d_model != self.vectors.shape[1]:
            raise PromptError(f"prompt width {self.vectors.shape[1]} does not match the model's d_model {spec.d_model}")
        layout = layout_for(model, self.length)
        self._family = spec.family
        self._offset = layout.offset
        self._batch = batch
        if batch is None:
            self._placeholder_id = layout.pad_id
            self._placeholder = compat.embed_tokens(model, torch.tensor([[layout.pad_id]]))[0, 0]
        try:
            with model.hooks(fwd_hooks=[(compat.embed_hook(model), self.hook)]):
                yield self
        finally:
            self._batch = None

    def save(self, path: str | Path) -> None:
        atomic_tensors(path, {"prompt": self.vectors.detach().float()})

    @classmethod
    def load(cls, path: str | Path) -> SoftPrompt:
        tensors = read_tensors(path, "prompt file", ["prompt"])
        try:
            return cls(tensors["prompt"])
        except ValueError as exc:
            raise FileFormatError(f"prompt file {path}: {exc}") from None


def _token_embeddings(model: HookedRootModule, ids) -> torch.Tensor:
    """[len(ids), d_model]: what the word-embedding hook holds for these tokens (any embedding scale applied)."""
    return compat.embed_tokens(model, torch.as_tensor(np.asarray(ids), dtype=torch.long)[None])[0].float().cpu()


def _embedding_matrix(model: HookedRootModule) -> torch.Tensor:
    W_E = getattr(model, "W_E", None)
    if W_E is None:
        W_E = compat.hf_model_of(model).get_input_embeddings().weight
    return W_E


@contextlib.contextmanager
def maybe_applied(
    prompt: SoftPrompt | None, model: HookedRootModule, batch: Batch | None = None
) -> Iterator[SoftPrompt | None]:
    if prompt is None:
        yield None
    else:
        with prompt.applied(model, batch) as p:
            yield p


def class_logits(
    model: HookedRootModule,
    batch: Batch,
    verbalizer: Verbalizer,
    prompt: SoftPrompt | None = None,
    extra_hooks: Sequence = (),
) -> Float[torch.Tensor, "batch n_classes"]:
    """Verbalizer logits of `batch` under `prompt` (and any extra forward hooks).

    Only the label words' logits at the prediction position are needed, so the
    forward pass stops at the unembedding's input and projects that one
    position onto the label-word rows (then soft-caps them where the family
    does): the same numbers as the full logits, without a [batch, pos, d_vocab]
    product.
    """
    grabbed: dict[str, torch.Tensor] = {}
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)

    def take(resid, hook):
        grabbed["h"] = resid[rows, batch.pred_pos.to(resid.device)]
        raise compat.StopForward

    hooks = list(extra_hooks)
    fast = compat.UNEMBED_IN_HOOK in model.hook_dict
    if fast:
        hooks.append((compat.UNEMBED_IN_HOOK, take))
    with maybe_applied(prompt, model, batch), model.hooks(fwd_hooks=hooks):
        try:
            logits = compat.forward(model, batch.input_ids, batch.attention_mask)
        except compat.StopForward:
            pass
    if not fast:
        return verbalizer.class_logits(logits, batch.pred_pos)
    return compat.label_logits(model, grabbed["h"], verbalizer.token_ids)
