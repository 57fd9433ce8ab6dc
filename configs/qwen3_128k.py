"""The L2A recipe of configs/qwen25_128k.py for a local Qwen3 checkpoint (e.g. Qwen3-8B, as
the method was released):

    python train.py --config configs/qwen3_128k.py --config.model.checkpoint=/data/Qwen3-8B
"""

from configs.qwen25_128k import get_config as qwen25_config


def get_config():
    c = qwen25_config()
    c.workdir = "runs/qwen3_128k"
    return c
