"""One rank of ``test_distributed.py::test_token_weighted_metrics_over_ranks`` (gloo).

Usage: python _metrics_worker.py RANK WORLD PORT. Prints the JSON of ``token_weighted_metrics`` for this rank's
values: rank 0 has 3 tokens, rank 1 has none (its values are NaN), rank 2 has 1 token.
"""

import json
import math
import os
import sys

import torch.distributed as dist


def main() -> None:
    from dsalign.alignment.trainer.step import token_weighted_metrics

    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mine = {0: ({"kl": 1.0, "diff_max": 0.5}, 3), 1: ({"kl": math.nan, "diff_max": math.nan}, 0),
            2: ({"kl": 5.0, "diff_max": 0.25}, 1)}[rank]  # fmt: skip
    print("RESULT " + json.dumps(token_weighted_metrics(*mine)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
