"""dsalign.rewards: TRL-compatible reward functions, built-in verifiers, a combiner and a code sandbox.

Importing the package registers the built-ins (``math_accuracy``, ``think_format``, ``target_length``,
``soft_overlong``, ``kimi_length``, ``stop_properly``, ``markdown_style``, ``language_consistency``,
``code_execution``).
See docs/REWARDS.md.
"""

from .accuracy import extract_answer, math_accuracy
from .api import (
    RewardLoadError,
    RewardSignatureError,
    completion_text,
    get_reward,
    list_rewards,
    load_reward,
    register_reward,
    reward_name,
    trl_reward_inputs,
    unfilled_parameters,
)
from .code import code_execution, extract_code
from .combine import (
    CombinedRewards,
    RewardCombiner,
    RewardError,
    RewardFailure,
    RewardSpec,
    combine_rewards,
    concat_results,
)
from .format import think_format
from .length import kimi_length, soft_overlong, stop_properly, target_length
from .sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, run_many, run_python, sandbox_support
from .style import language_consistency, markdown_style

__all__ = [
    "CombinedRewards",
    "RewardCombiner",
    "RewardError",
    "RewardFailure",
    "RewardLoadError",
    "RewardSignatureError",
    "RewardSpec",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "code_execution",
    "combine_rewards",
    "concat_results",
    "completion_text",
    "extract_answer",
    "extract_code",
    "get_reward",
    "kimi_length",
    "language_consistency",
    "list_rewards",
    "load_reward",
    "markdown_style",
    "math_accuracy",
    "register_reward",
    "reward_name",
    "run_many",
    "run_python",
    "sandbox_support",
    "soft_overlong",
    "stop_properly",
    "unfilled_parameters",
    "target_length",
    "think_format",
    "trl_reward_inputs",
]
