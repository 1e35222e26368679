"""Backend-neutral policy: what may be touched, reached and used — never how it is enforced.

The helpers build filesystem fragments to merge into a request's ``filesystem`` section."""

from corral.policy.helpers import merge, temporary_files_policy, tools_policy, user_profile_policy

__all__ = ["merge", "temporary_files_policy", "tools_policy", "user_profile_policy"]
