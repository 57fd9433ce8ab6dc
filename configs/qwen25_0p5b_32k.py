"""A Qwen2.5-0.5B-shaped L2A model trained from random initialisation at 32K tokens on one
GPU (the shape of bench/train_step.py): 24 layers, hidden 896, 14 query / 2 kv heads of 64,
the Qwen vocabulary, bf16, the Pallas kernels.

    python train.py --config configs/qwen25_0p5b_32k.py --config.data.files=/data/text/
"""

from l2a_jax.training.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/qwen25_0p5b_32k"
    c.model.init = "random"
    c.model.architecture = "Qwen2ForCausalLM"
    c.model.vocab_size = 151936
    c.model.hidden_size = 896
    c.model.intermediate_size = 4864
    c.model.num_layers = 24
    c.model.num_heads = 14
    c.model.num_kv_heads = 2
    c.model.head_dim = 64
    c.model.rope_theta = 1e6
    c.model.dtype = "bfloat16"
    c.l2a.window = 4096
    c.data.tokenizer = "qwen"
    c.data.seq_len = 32768
    c.data.batch_size = 1
    c.data.needle_rate = 0.1
    c.train.trainable = "all"
    # layers run in one scan keep every residual: "dots" (matmul outputs kept, the rest
    # recomputed) trains at 29 GiB instead of 65 GiB on an H200, 7% slower (bench/RESULTS.md)
    c.train.remat = "dots"
    c.train.steps = 2000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 100
    c.train.sparsity_weight = 1e-7
    c.train.sparsity_warmup_steps = 200
    c.train.checkpoint_every = 200
    return c
