"""Shared settings of the benchmarks: the ~20M-parameter Llama config, timing."""
import time

from restem_jax import model

# ~19M parameters: vocab 8192, d 384, 8 layers, 6 heads (2 kv heads), SwiGLU 1024, untied head.
LLAMA_20M = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                 rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def our_config(hf: dict, **kw) -> model.ModelConfig:
  return model.ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
      mlp_dim=hf["intermediate_size"], rope_theta=hf["rope_theta"], rms_eps=hf["rms_norm_eps"],
      tie_embeddings=hf["tie_word_embeddings"], **kw)


def best_of(fn, repeats: int) -> float:
  """Smallest wall time of `repeats` calls of fn (which must block until done)."""
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best
