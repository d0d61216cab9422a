"""Generate a tiny CosyVoice2-style model directory that the real CosyVoice library loads on a CPU.

Same file names and layout as a released CosyVoice2-0.5B directory, tiny dimensions, random weights:

    cosyvoice2.yaml             the library's hyperpyyaml config (llm / flow / hift / tokenizer / feat_extractor)
    llm.pt, flow.pt, hift.pt    state dicts of the modules that config builds, saved with torch.save
    campplus.onnx               speaker-embedding stand-in: fbank [1, T, 80] -> embedding [1, 192]
    speech_tokenizer_v2.onnx    speech-tokenizer stand-in: whisper log-mel [1, 128, T] -> tokens [1, T/4] (25 Hz)
    CosyVoice-BlankEN/          a tiny Qwen2 (config + weights) and a byte-level BPE tokenizer

The modules are built by the library itself from the config, so the state-dict keys are exactly the ones
its ``load()`` expects: a renamed parameter or class in the library fails loading here, not on a GPU.

Deterministic length: the LLM head's bias makes every stop token impossible, so the LLM always emits its
maximum, ``MAX_TOKEN_TEXT_RATIO`` speech tokens per text token (25 tokens/s, 960 samples per token at 24 kHz).

``make_tiny_cosyvoice3`` writes the same for CosyVoice3 (Fun-CosyVoice3-0.5B's layout: cosyvoice3.yaml,
speech_tokenizer_v3.onnx; CosyVoice3LM, the DiT flow CausalMaskedDiffWithDiT, CausalHiFTGenerator). It needs
a CosyVoice library that has CosyVoice3 (upstream's; the PyPI fork cosyvoice2-eu has not): see
scripts/upstream-env.sh. Same deterministic length, by another route (CosyVoice3LM's head has no bias).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SPEECH_TOKENS = 64  # speech-token vocabulary (6561 in the real model)
HIDDEN = 32  # Qwen2 hidden size (896 in the real model)
TEXT_VOCAB = 320  # Qwen2 vocabulary: 256 bytes + <|endoftext|> + the library's added special tokens
SPK_DIM = 192  # CAM++ embedding size: fixed by the library
MAX_TOKEN_TEXT_RATIO = 20  # the library's default in Qwen2LM.inference
SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 24 kHz / 25 Hz
HIFT_CACHE_SAMPLES = 8 * 480  # CosyVoice2Model.source_cache_len: held back from each streamed chunk

# CosyVoice3: Qwen2's special-token ids matter, CosyVoice3LM.inference asserts <|endofprompt|> (151646) in the text.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endofprompt|>")  # ids 151643.. as in Qwen2
QWEN_SPECIALS_AT = 151643
ENDOFPROMPT = 151646
QWEN_VOCAB = 151936  # Qwen2's embedding rows: room for the ~280 tokens CosyVoice3's tokenizer adds after 151646
HIDDEN3 = 16  # 151936 embedding rows: the hidden size is what keeps the CosyVoice3 LLM small
# CosyVoice3Model.silent_tokens: llm_job drops runs of more than 5 of them, so the tiny LLM never emits them.
SILENT_TOKENS3 = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)

# What both families' configs share: the header and the LLM (the class differs), then the vocoder and frontend.
_HEADER_AND_LLM = """\
# {title}
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.%(llm)s
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_tokens}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

"""

_VOCODER_AND_FRONTEND = """\
hift: !new:cosyvoice.hifigan.generator.%(hift)s
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {hift_kernels}
    resblock_dilation_sizes: {hift_dilations}
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
%(hift_extra)s    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.%(f0)s
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
%(tokenizer_extra)sallowed_special: 'all'

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: %(fmax)s
    center: False
"""

CONFIG = _HEADER_AND_LLM % {"llm": "Qwen2LM"} + """\
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512  # the library hard-codes 512 channels in the encoder's lookahead and upsampling layers
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_tokens}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {enc_heads}
        linear_units: {enc_units}
        num_blocks: {enc_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{dec_channels}]
            dropout: 0.0
            attention_head_dim: {dec_head_dim}
            n_blocks: {dec_blocks}
            num_mid_blocks: {dec_mid_blocks}
            num_heads: {dec_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

"""
CONFIG += _VOCODER_AND_FRONTEND % {"hift": "HiFTGenerator", "hift_extra": "", "f0": "ConvRNNF0Predictor",
                                  "tokenizer_extra": "", "fmax": "8000"}


CONFIG3 = _HEADER_AND_LLM % {"llm": "CosyVoice3LM"} + """\
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_tokens}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {lookahead_channels}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}  # a multiple of 16: the DiT's convolutional position embedding has 16 groups
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_head_dim}
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

"""  # the HiFT, tokenizer and feature blocks: _VOCODER_AND_FRONTEND
CONFIG3 += _VOCODER_AND_FRONTEND % {"hift": "CausalHiFTGenerator", "hift_extra": "    conv_pre_look_right: 4\n",
                                   "f0": "CausalConvRNNF0Predictor", "tokenizer_extra": "    version: cosyvoice3\n",
                                   "fmax": "null"}



def expected_tokens(text: str) -> int:
    """Speech tokens the tiny LLM emits for ``text`` (byte-level tokenizer, stop tokens disabled)."""
    return len(text.encode("utf-8")) * MAX_TOKEN_TEXT_RATIO


TINY_QWEN = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 4096}


def _write_qwen(folder: Path, qwen: dict, vocab_size: int = TEXT_VOCAB, qwen_ids: bool = False) -> None:
    """A random Qwen2 of the given shape with a byte-level BPE tokenizer (every UTF-8 byte one token).

    ``qwen_ids``: the tokenizer also has QWEN_SPECIALS at Qwen2's ids (151643..151646), so the library's
    tokenizer keeps them there and adds its own special tokens after them, as with the real Qwen2."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = QWEN_SPECIALS if qwen_ids else ()
    vocab.update({token: QWEN_SPECIALS_AT + i for i, token in enumerate(specials)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    if specials:  # in the model's vocabulary *and* added: the added-token ids are then the model's
        bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(str(folder))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **qwen)
    Qwen2ForCausalLM(config).save_pretrained(str(folder))


def _onnx_campplus(path: Path) -> None:
    """fbank [1, T, 80] -> mean over time -> linear -> [1, 192]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((80, SPK_DIM)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["embedding"])],
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, SPK_DIM])],
        [numpy_helper.from_array(w, "w")])
    _save_onnx(onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _onnx_speech_tokenizer(path: Path, speech_tokens: int) -> None:
    """log-mel [1, 128, T] (100 frames/s) -> every 4th frame -> a token id in [0, speech_tokens) (25 Hz)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = {"starts": np.array([0], np.int64), "ends": np.array([2**62], np.int64),
              "axes": np.array([2], np.int64), "steps": np.array([4], np.int64),
              "scale": np.array(997.0, np.float32), "n": np.array(speech_tokens, np.int64)}
    nodes = [
        helper.make_node("Slice", ["feats", "starts", "ends", "axes", "steps"], ["sub"]),
        helper.make_node("ReduceSum", ["sub", "axes_mel"], ["energy"], keepdims=0),
        helper.make_node("Mul", ["energy", "scale"], ["scaled"]),
        helper.make_node("Floor", ["scaled"], ["floored"]),
        helper.make_node("Abs", ["floored"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["ids"], to=TensorProto.INT64),
        helper.make_node("Mod", ["ids", "n"], ["tokens"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes_mel"))
    graph = helper.make_graph(
        nodes, "speech_tokenizer_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "N"])], inits)
    _save_onnx(onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _save_onnx(onnx, model, path: Path) -> None:  # noqa: ANN001 - the onnx module
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _no_stop(llm, speech_tokens: int) -> None:  # noqa: ANN001 - the library's Qwen2LM
    """Stop tokens (speech_token_size and above) can never win: the length is always the maximum."""
    llm.llm_decoder.weight[speech_tokens:] = 0
    llm.llm_decoder.bias[speech_tokens:] = -1e4


def _no_stop3(llm, speech_tokens: int) -> None:  # noqa: ANN001 - the library's CosyVoice3LM
    """The same for CosyVoice3LM, whose head has no bias: a constant feature stands in for one.

    Every input embedding (text and speech) gets feature 0 = 10 and no layer writes feature 0, so the
    residual stream's feature 0 is 10 everywhere: after the final RMSNorm it is positive and dominant (about
    3; the other features of the random embeddings are N(0, 1) at most). The head's stop rows, and those of
    CosyVoice3Model's silent tokens, read only that feature, with weight -1e4 (their probabilities underflow
    to exactly 0); the speech rows ignore it."""
    qwen = llm.llm.model.model
    qwen.embed_tokens.weight[:, 0] = 10.0
    llm.speech_embedding.weight[:, 0] = 10.0
    for layer in qwen.layers:
        layer.self_attn.o_proj.weight[0] = 0
        layer.mlp.down_proj.weight[0] = 0
    banned = [t for t in SILENT_TOKENS3 if t < speech_tokens] + list(range(speech_tokens, llm.llm_decoder.out_features))
    llm.llm_decoder.weight[:, 0] = 0
    llm.llm_decoder.weight[banned] = 0
    llm.llm_decoder.weight[banned, 0] = -1e4


def _write_state_dicts(model_dir: Path, speech_tokens: int, config_name: str = "cosyvoice2.yaml",
                       no_stop=_no_stop) -> dict[str, int]:  # noqa: ANN001 - _no_stop or _no_stop3
    """Build llm/flow/hift with the library from the config; save their random weights under its file names.

    Returns each module's parameter count."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    torch.manual_seed(0)
    with open(model_dir / config_name) as f:
        configs = load_hyperpyyaml(f, overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
    llm = configs["llm"]
    with torch.no_grad():
        no_stop(llm, speech_tokens)
    counts = {}
    for name, module in (("llm", llm), ("flow", configs["flow"]), ("hift", configs["hift"])):
        torch.save(module.state_dict(), model_dir / f"{name}.pt")
        counts[name] = sum(p.numel() for p in module.parameters())
    return counts


def write_model(model_dir: Path, config: str, qwen: dict, speech_tokens: int) -> dict[str, int]:
    """A CosyVoice2 model folder of any shape, built by the library from ``config`` (random weights).

    Returns the parameter counts. Used for the tiny test model here and the full-size one of
    bench/full_cosyvoice.py. Needs torch, transformers, onnx and the CosyVoice library."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "cosyvoice2.yaml").write_text(config)
    _write_qwen(model_dir / "CosyVoice-BlankEN", qwen)
    _onnx_campplus(model_dir / "campplus.onnx")
    _onnx_speech_tokenizer(model_dir / "speech_tokenizer_v2.onnx", speech_tokens)
    return _write_state_dicts(model_dir, speech_tokens)


# The dimensions CONFIG leaves open; bench/full_cosyvoice.py fills them with CosyVoice2-0.5B's.
TINY_DIMS = {"title": "A tiny CosyVoice2 config for tests (generated by tests/tiny_cosyvoice.py). Random weights.",
             "hidden": HIDDEN, "speech_tokens": SPEECH_TOKENS, "enc_heads": 2, "enc_units": 64, "enc_blocks": 1,
             "dec_channels": 32, "dec_head_dim": 16, "dec_blocks": 1, "dec_mid_blocks": 1, "dec_heads": 2,
             "hift_channels": 16, "hift_kernels": [3], "hift_dilations": [[1, 3, 5]], "f0_channels": 16}


def config(dims: dict) -> str:
    """CONFIG with these dimensions (every key of TINY_DIMS)."""
    return CONFIG.format(**dims)


def make_tiny_model(model_dir: Path) -> Path:
    """Write the tiny model into ``model_dir`` (created); returns it."""
    write_model(model_dir, config(TINY_DIMS), TINY_QWEN, SPEECH_TOKENS)
    (Path(model_dir) / "tiny.json").write_text(json.dumps({"speech_tokens": SPEECH_TOKENS, "hidden": HIDDEN,
                                                           "note": "random weights, for tests only"}))
    return Path(model_dir)


TINY_DIMS3 = {"title": "A tiny CosyVoice3 config for tests (generated by tests/tiny_cosyvoice.py). Random weights.",
              "hidden": HIDDEN3, "speech_tokens": SPEECH_TOKENS, "lookahead_channels": 32, "dit_dim": 32,
              "dit_depth": 1, "dit_heads": 2, "dit_head_dim": 16, "hift_channels": 16, "hift_kernels": [3],
              "hift_dilations": [[1, 3, 5]], "f0_channels": 16}
TINY_QWEN3 = {**TINY_QWEN, "hidden_size": HIDDEN3, "intermediate_size": 32}


def make_tiny_cosyvoice3(model_dir: Path) -> Path:
    """Write a tiny CosyVoice3 model into ``model_dir`` (created); returns it. Needs upstream's library.

    Prompt texts must contain <|endofprompt|> (CosyVoice3LM asserts it): it is one token, 151646, and
    every other character one byte token, so a text of n UTF-8 bytes gives exactly 20 n speech tokens."""
    from cosyvoice.llm.llm import CosyVoice3LM  # noqa: F401 - fails early where the library has no CosyVoice3

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "cosyvoice3.yaml").write_text(CONFIG3.format(**TINY_DIMS3))
    _write_qwen(model_dir / "CosyVoice-BlankEN", TINY_QWEN3, vocab_size=QWEN_VOCAB, qwen_ids=True)
    _onnx_campplus(model_dir / "campplus.onnx")
    _onnx_speech_tokenizer(model_dir / "speech_tokenizer_v3.onnx", SPEECH_TOKENS)
    _write_state_dicts(model_dir, SPEECH_TOKENS, "cosyvoice3.yaml", _no_stop3)
    (model_dir / "tiny.json").write_text(json.dumps({"speech_tokens": SPEECH_TOKENS, "hidden": HIDDEN3,
                                                     "family": "CosyVoice3", "note": "random weights, for tests only"}))
    return model_dir


def make_voice(voices_dir: Path, name: str = "tiny", seconds: float = 2.0, rate: int = 22050,
               transcript: str = "A short reference sentence.") -> Path:
    """A voice folder in the registry's layout: voice.json + reference.wav (a chirp with a little noise)."""
    import soundfile as sf

    folder = Path(voices_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(len(name))
    audio = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.01 * rng.standard_normal(t.size)
    sf.write(str(folder / "reference.wav"), audio.astype(np.float32), rate, subtype="PCM_16")
    (folder / "voice.json").write_text(json.dumps({"name": name, "transcript": transcript, "language": "en",
                                                   "audio": "reference.wav", "sample_rate": rate,
                                                   "duration_s": seconds}))
    return folder


if __name__ == "__main__":  # python tests/tiny_cosyvoice.py DIR [--cosyvoice3]
    make = make_tiny_cosyvoice3 if "--cosyvoice3" in sys.argv[2:] else make_tiny_model
    print(make(Path(sys.argv[1])))
