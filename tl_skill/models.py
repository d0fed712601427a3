"""Loading models: the bundled SmolLM2, tiny random models for tests, any Hugging Face model."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from tl_skill import compat
from tl_skill.bundled import BUNDLED_MODELS, SMOLLM2, bundled_dir, cache_dir
from tl_skill.compat import HookedRootModule
from tl_skill.data.sources import rotten_tomatoes_frame
from tl_skill.errors import CertificationError, DeviceError, ModelLoadError
from tl_skill.files import hub_unreachable

log = logging.getLogger(__name__)

DEFAULT_MODEL = SMOLLM2
TINY_VOCAB = 4096
_MASKED_ARCHS = ("ForMaskedLM",)


@dataclass(frozen=True)
class ModelSpec:
    """What tl_skill needs to know about a model."""

    name: str
    family: str  # "causal" or "masked"
    n_layers: int
    d_mlp: int
    d_model: int
    d_vocab: int
    architecture: str
    gated_mlp: bool

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEVICE_NAMES = "cpu, cuda, cuda:N (N = 0, 1, ...), mps or auto"


def check_device_name(device: str) -> str:
    """Refuse a device string tl_skill does not run on (gpu, xla, cuda:x), listing the valid ones."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", str(device)):
        raise DeviceError(f"unknown device {device!r}; choose one of {DEVICE_NAMES}")
    return str(device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device):
        check_device_name(device)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {device!r} is not supported; choose one of {DEVICE_NAMES}")
    if (
        dev.type == "cuda"
        and dev.index is not None
        and torch.cuda.is_available()
        and dev.index >= torch.cuda.device_count()
    ):
        raise DeviceError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but torch sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} asked for, but MPS is not available")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


def _training_text() -> list[str]:
    frame = rotten_tomatoes_frame()
    return frame["text"].tolist()


def tiny_tokenizer_dir(bos: bool = False) -> Path:
    """A 4096-token byte-level BPE trained once on the bundled review text (no download).

    With `bos`, the same vocabulary with a post-processor that puts `<bos>` first, as Gemma's
    tokenizer does (the tiny Gemma models use it).
    """
    target = cache_dir() / "tokenizers" / (f"tiny-bpe-{TINY_VOCAB}" + ("-bos" if bos else ""))
    if (target / "tokenizer_config.json").exists():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if bos:
        tk = Tokenizer.from_file(str(tiny_tokenizer_dir() / "tokenizer.json"))
        bos_id = tk.token_to_id("<bos>")
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
        )
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB,
            special_tokens=["<pad>", "<bos>", "<eos>", "<mask>", "<cls>", "<sep>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(_training_text(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        mask_token="<mask>",
        cls_token="<cls>",
        sep_token="<sep>",
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        pass
    return target


_W = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160, max_position_embeddings=512
)
_GQA = dict(_W, num_key_value_heads=2)


def _family_configs() -> dict[str, tuple[str, str, dict[str, Any]]]:
    gpt = dict(n_embd=64, n_layer=2, n_head=4, n_inner=160, n_positions=512)
    return {
        "tiny-gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_W, rotary_pct=0.25)),
        "tiny-gptj": ("GPTJForCausalLM", "GPTJConfig", dict(gpt, rotary_dim=8)),
        "tiny-opt": (
            "OPTForCausalLM",
            "OPTConfig",
            dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=160,
                max_position_embeddings=512,
                word_embed_proj_dim=64,
            ),
        ),
        "tiny-bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),
        "tiny-falcon": (
            "FalconForCausalLM",
            "FalconConfig",
            dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_hidden_size=160,
                new_decoder_architecture=False,
                multi_query=True,
                parallel_attn=True,
                alibi=False,
            ),
        ),
        "tiny-mistral": ("MistralForCausalLM", "MistralConfig", dict(_GQA, sliding_window=None)),
        "tiny-qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _GQA),
        "tiny-qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_GQA, head_dim=16)),
        "tiny-phi": ("PhiForCausalLM", "PhiConfig", _W),
        "tiny-phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_W, num_key_value_heads=4)),
        "tiny-olmo": ("OlmoForCausalLM", "OlmoConfig", _W),
        "tiny-olmo2": ("Olmo2ForCausalLM", "Olmo2Config", _W),
        "tiny-olmo3": ("Olmo3ForCausalLM", "Olmo3Config", _GQA),
        "tiny-stablelm": ("StableLmForCausalLM", "StableLmConfig", dict(_W, num_key_value_heads=4)),
        "tiny-gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_W, num_key_value_heads=1, head_dim=16)),
        "tiny-starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", _GQA),
        "tiny-granite": ("GraniteForCausalLM", "GraniteConfig", dict(_GQA, logits_scaling=4.0)),
        "tiny-cohere": ("CohereForCausalLM", "CohereConfig", _GQA),
        "tiny-smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", _GQA),
        "tiny-gpt-bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", gpt),
        "tiny-roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(_W, max_position_embeddings=514)),
        # mixture of experts: refused for neuron work (basis.py says why)
        "tiny-mixtral": (
            "MixtralForCausalLM",
            "MixtralConfig",
            dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
        ),
        "tiny-qwen2-moe": (
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            dict(
                _GQA,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=48,
                shared_expert_intermediate_size=96,
            ),
        ),
        "tiny-olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(_GQA, num_experts=4, num_experts_per_tok=2)),
    }


# The tiny random models the tests use: (Hugging Face model class, config class, config settings).
# Each is a few layers of small width with the family's distinctive parts; the tokenizer is the tiny BPE.
TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tiny-gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_positions=512, n_embd=64, n_layer=2, n_head=4, n_inner=256)),
    "tiny-llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    ),
    # sliding and full attention layers, q/k norms, scaled embeddings, BOS
    "tiny-gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
    ),
    # final-logit soft-capping
    "tiny-gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            final_logit_softcapping=2.0,
        ),
    ),
    # More families of the TransformerBridge (the certified-architectures matrix, docs/architectures.md): two
    # layers of width 64, MLPs of width 160 (so the output projection is told apart from attention's).
    **_family_configs(),
    "tiny-bert": (
        "BertForMaskedLM",
        "BertConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=512,
        ),
    ),
}
_TINY_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
TINY_MODELS = tuple(TINY_CONFIGS)
KNOWN_MODELS = (*BUNDLED_MODELS, *TINY_MODELS)


def _tiny_hf_model(name: str, seed: int) -> torch.nn.Module:
    import transformers

    model_class, config_class, settings = TINY_CONFIGS[name]
    cls = getattr(transformers, model_class)
    tokens = {"pad_token_id": 0} if model_class.startswith("Bert") else _TINY_TOKENS
    cfg = getattr(transformers, config_class)(vocab_size=TINY_VOCAB, attn_implementation="eager", **tokens, **settings)
    cfg.architectures = [cls.__name__]  # what a saved config says; the bridge picks its adapter by it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def tiny_model_dir(name: str = "tiny-llama", seed: int = 0) -> Path:
    """A Hugging Face model directory (config, safetensors weights, tokenizer) of tiny random model `name`,
    written once under the cache: what `from_pretrained` reads, for examples and tests that boot their own
    model exactly as one would boot a real one."""
    if name not in TINY_CONFIGS:
        raise ModelLoadError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    target = cache_dir() / "tiny_models" / f"{name}-seed{seed}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    cast(Any, _tiny_hf_model(name, seed)).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=name.startswith("tiny-gemma"))).save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _spec_from(model: HookedRootModule, name: str, hf) -> ModelSpec:
    archs = list(getattr(hf.config, "architectures", None) or [type(hf).__name__])
    masked = any(a.endswith(_MASKED_ARCHS) for a in archs) or type(hf).__name__.endswith(_MASKED_ARCHS)
    gated = compat.gated_mlp(model)
    cfg = model.cfg
    d_mlp = int(cfg.d_mlp)
    if not compat.mixture_of_experts(model):
        try:  # the MLP's own width (some configs, e.g. OPT's in TransformerLens 4.3, say 4 x d_model)
            d_mlp = compat.projection_width(model, 0)
        except CertificationError:
            pass
    return ModelSpec(
        name=name,
        family="masked" if masked else "causal",
        n_layers=int(cfg.n_layers),
        d_mlp=d_mlp,
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
        architecture=archs[0],
        gated_mlp=gated,
    )


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors_weights(path: Path) -> None:
    """Refuse, in one line, a model directory whose weights are pickle files only: tl_skill loads
    safetensors, since unpickling a file can run any code in it."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise ModelLoadError(
            f"{path} holds its weights as pickle files ({', '.join(pickles[:3])}) and no .safetensors file; "
            "tl_skill loads safetensors only (a pickle can run code when loaded). Convert them where you trust "
            "the file, e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`"
        )


def _load_hf_pretrained(path_or_id: str, dtype: torch.dtype, attn: str, local_only: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path_or_id, local_files_only=local_only)
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForMaskedLM if any(a.endswith(_MASKED_ARCHS) for a in archs) else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(path_or_id, local_files_only=local_only)
    hf = auto.from_pretrained(
        path_or_id, dtype=dtype, attn_implementation=attn, local_files_only=local_only, use_safetensors=True
    )
    return hf, tok


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
    kind: str | None = None,
) -> HookedRootModule:
    """Load a model as a TransformerLens `TransformerBridge` (a `HookedTransformer` on TransformerLens 3.x).

    Args:
        name: `smollm2-135m` or `gemma3-270m` (bundled, offline), `tiny-gpt2` / `tiny-llama` /
            `tiny-bert` / `tiny-gemma3` / `tiny-gemma2` (random, built from a config), a local
            Hugging Face model directory, or a Hugging Face hub id.
        device: "cpu", "cuda", "cuda:1", "mps"; default: CUDA when available.
        dtype: float32 (default), bfloat16 or float16.
        seed: initialisation seed of the tiny models.
        attn_implementation: attention kernel. The bridge needs "eager" for its
            attention-pattern hooks, and on this project's CPUs eager backward is
            ~10x faster than SDPA; pass "sdpa" to override.
        kind: "bridge" or "hooked" (HookedTransformer, TransformerLens 3.x only);
            default: the bridge on 4.x, the HookedTransformer on 3.x.

    Returns:
        The model (see `compat.build_model`), frozen (no parameter requires grad) and in eval mode; its
        `ModelSpec` is available through `model_spec(model)`.
    """
    compat.check_kind(kind)
    # Building the model (random init before weights are loaded) draws from torch's global
    # generator; the caller's random stream should not depend on whether a model was loaded.
    with torch.random.fork_rng(devices=[]):
        return _load_model(name, device, dtype, seed, attn_implementation, kind)


def _load_model(name, device, dtype, seed, attn_implementation, kind):
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    attn = attn_implementation or "eager"
    if name in TINY_MODELS:
        hf = _tiny_hf_model(name, seed)
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=name.startswith("tiny-gemma")))
    elif name in BUNDLED_MODELS:
        path = bundled_dir(name)
        tok = AutoTokenizer.from_pretrained(path)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    elif os.path.isdir(name):
        check_safetensors_weights(Path(name))
        try:
            hf, tok = _load_hf_pretrained(name, torch.float32, attn)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a Hugging Face model from directory {name!r}: {exc}") from exc
    else:
        if "/" not in name and not name.startswith(("gpt2", "bert", "roberta", "distil")):
            raise ModelLoadError(
                f"unknown model {name!r}. Known: {', '.join(KNOWN_MODELS)}; "
                "or give a local Hugging Face model directory or a hub id such as 'gpt2' "
                "or 'HuggingFaceTB/SmolLM2-360M'"
            )
        offline = hub_unreachable()
        try:  # offline: only a copy already in the local Hugging Face cache, without retries
            hf, tok = _load_hf_pretrained(name, torch.float32, attn, local_only=offline is not None)
        except (OSError, ValueError) as exc:
            why = (
                f"{offline}, and no copy is in the local Hugging Face cache"
                if offline
                else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            raise ModelLoadError(
                f"cannot load {name!r} from the Hugging Face hub ({why}). Use the bundled offline model "
                f"{SMOLLM2!r} or a local model directory."
            ) from exc
    if attn_implementation is not None and hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(attn)
    hf = hf.to(device=dev, dtype=dt).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    model = compat.build_model(hf, tok, name, device=str(dev), kind=kind)
    if attn_implementation is not None and hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(attn)  # the bridge forces eager on pre-loaded models
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model._tl_skill_spec = _spec_from(model, name, hf)
    return model


_SPECS: weakref.WeakKeyDictionary[torch.nn.Module, ModelSpec] = weakref.WeakKeyDictionary()


def model_spec(model: HookedRootModule) -> ModelSpec:
    """The `ModelSpec` of a model loaded by `load_model` (or inferred from its config, once per model).

    A model you built yourself is inferred the first time and remembered beside it (a weak reference:
    nothing is stored on the model), so every later step reads the same facts.
    """
    spec = getattr(model, "_tl_skill_spec", None)
    if spec is not None:
        return spec
    cached = _SPECS.get(model)
    cfg = model.cfg
    if cached is not None and (cached.n_layers, cached.d_mlp) == (int(cfg.n_layers), int(cfg.d_mlp)):
        return cached
    spec = _infer_spec(model)
    _SPECS[model] = spec
    compat.notice(
        model,
        "name",
        f"this model was not loaded by tl_skill.load_model: result files name it {spec.name!r} (its "
        "cfg.model_name), and commands that reload it (the CLI) load that name",
    )
    return spec


def _infer_spec(model: HookedRootModule) -> ModelSpec:
    hf = getattr(model, "original_model", None)
    name = getattr(model.cfg, "model_name", None) or "unknown"
    if hf is not None:
        spec = _spec_from(model, name, hf)
    else:  # a HookedTransformer
        cfg = model.cfg
        spec = ModelSpec(
            name=name,
            family="causal",
            n_layers=int(cfg.n_layers),
            d_mlp=int(cfg.d_mlp),
            d_model=int(cfg.d_model),
            d_vocab=int(cfg.d_vocab),
            architecture=str(getattr(cfg, "original_architecture", None) or "HookedTransformer"),
            gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
        )
    return spec


def spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.to_dict())
