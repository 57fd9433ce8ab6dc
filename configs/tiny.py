"""The README's main job: a small L2A model trained from scratch on a CPU, on generated
retrieval tasks and the embedded corpus (the Python help topics, which ship with Python).

55% of the rows are recall drills (``data/pipeline.py``): short documents that each ask for a
number seen 16+ tokens earlier, so the model learns to copy from far back; 35% are RULER-style
needle tasks trained on their answers, so it learns the template ``eval.py --task niah`` asks
with; 10% are the corpus. The window (16 keys) is short beside the 512-token rows, so
retrieval has to go through the global branch. Every token uses it for the first 700 steps;
over the next 600 the routers take over gradually (a token the router skips is still routed
at random, with a probability falling from 1 to 0), and from step 1000 a sparsity penalty
ramps up, so the routers keep the global branch for the tokens that need it (the answers).
Handing over all at once, at one step, broke retrieval on some seeds. The router temperature
is 1 (the recipe's 0.1 suits routers that start at zero and move slowly): trained from scratch
at this learning rate, router logits grow to several units, and at 0.1 their sigmoid
saturates, so a token a router has stopped routing gets no gradient to route it again, even
where an answer needs it."""

from l2a_jax.training.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/tiny"
    c.model.init = "random"
    c.model.architecture = "Qwen3ForCausalLM"
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.rope_theta = 10000.0
    c.l2a.window = 16
    c.l2a.tau = 1.0
    c.data.tokenizer = "bytes"
    c.data.seq_len = 512
    c.data.batch_size = 8
    c.data.needle_rate = 0.35
    c.data.needle_haystacks = ("noise",)
    c.data.needle_loss = "answer"
    c.data.drill_rate = 0.55
    c.data.drill_length = 48
    c.data.drill_gap = 16
    c.train.steps = 2000
    c.train.trainable = "all"
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 30
    c.train.sparsity_weight = 2e-4
    c.train.route_all_steps = 700
    c.train.route_all_decay_steps = 600
    c.train.sparsity_warmup_steps = 1000
    # half the steps run the global branch over every token (free on a CPU, where the jnp path
    # computes it anyway), so a router that stopped routing a token that needs it still sees
    # what global attention would have given it
    c.train.dense_step_prob = 0.5
    c.train.checkpoint_every = 200
    c.train.log_every = 20
    return c
