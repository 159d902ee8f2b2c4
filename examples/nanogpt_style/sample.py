"""Generate from exported weights with plain PyTorch, as nanoGPT's sample.py: no trainkit here.

trainkit ckpt export OUT_DIR --to torch --model-only --out model.pt
python examples/nanogpt_style/sample.py model.pt --meta DATA/meta.json --start "the cat"
"""

from __future__ import annotations

import argparse
import json

import torch
from model import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("weights", help="a state dict written by `trainkit ckpt export --to torch`")
parser.add_argument("--meta", required=True, help="prepare.py's meta.json (the alphabet)")
parser.add_argument("--start", default="the ")
parser.add_argument("--tokens", type=int, default=60)
parser.add_argument("--temperature", type=float, default=0.8)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

with open(args.meta) as file:
    alphabet = json.load(file)["alphabet"]
model = GPT(GPTConfig())
model.load_state_dict(torch.load(args.weights, weights_only=True))  # plain tensors, strict keys
model.eval()
prompt = torch.tensor([[alphabet.index(char) for char in args.start]])
torch.manual_seed(args.seed)
tokens = model.generate(prompt, args.tokens, temperature=args.temperature)[0].tolist()
# ids past the alphabet exist only because vocab_size is rounded up (nanoGPT pads its vocabulary too)
print("".join(alphabet[token] if token < len(alphabet) else "?" for token in tokens))
