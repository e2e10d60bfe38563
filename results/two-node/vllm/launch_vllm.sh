#!/usr/bin/env bash
# vLLM pipeline parallelism for ixc2-4khd-7b on [2x rtx3060 (12.0 GiB), pcie4 x16] x2 over eth-100g — written by xctune (plan 172ebaee49).
#   stage 0: node 0, GPU 0 (rtx3060), decoder layers 0-7 + vision encoder, projector, embeddings
#   stage 1: node 0, GPU 1 (rtx3060), decoder layers 8-22
#   stage 2: node 1, GPU 2 (rtx3060), decoder layers 23-28
#   stage 3: node 1, GPU 3 (rtx3060), decoder layers 29-31 + norm, head
#
# Several nodes: vLLM runs on a Ray cluster. On every node, export VLLM_PP_LAYER_PARTITION as below,
# then start Ray: on node 0 (the head)  `ray start --head --port=6379`;
#                 on every other node   `ray start --address=<node 0's address>:6379`.
# Run this script on node 0: vLLM ranks the head node's GPUs first, as the stages below assume.
set -euo pipefail
if [ -z "${XCTUNE_FORCE:-}" ]; then
  echo "vLLM does not support ixc2-4khd-7b: see README.md (XCTUNE_FORCE=1 runs the command anyway)" >&2
  exit 1
fi
export VLLM_PP_LAYER_PARTITION="8,15,6,3"
exec vllm serve "${MODEL:-internlm/internlm-xcomposer2-4khd-7b}" \
  --trust-remote-code \
  --dtype float16 \
  --pipeline-parallel-size 4 \
  --tensor-parallel-size 1 \
  --max-model-len 9661 \
  --distributed-executor-backend ray \
  "$@"
