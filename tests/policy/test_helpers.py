"""Policy helpers, used for real: a sandbox built from them can run tools, write scratch
files and read configuration, but not credentials."""

from __future__ import annotations

import os

import corral
from corral.policy.helpers import merge, temporary_files_policy, tools_policy, user_profile_policy


def test_tools_policy_lists_existing_path_dirs() -> None:
    frag = tools_policy("/usr/bin:/nonexistent:relative:/usr/bin:/bin")
    assert frag == {"readonlyPaths": ["/usr/bin", "/bin"]}


def test_helpers_compose_into_a_working_sandbox(tmp_path: os.PathLike[str]) -> None:
    home = os.path.join(tmp_path, "home")
    os.makedirs(os.path.join(home, ".ssh"))
    os.makedirs(os.path.join(home, ".config", "tool"))
    with open(os.path.join(home, ".ssh", "id_rsa"), "w") as f:
        f.write("KEY")
    with open(os.path.join(home, ".config", "tool", "cfg"), "w") as f:
        f.write("setting=1")
    scratch = temporary_files_policy(os.path.join(tmp_path, "scratch"))
    fs = merge(tools_policy("/usr/bin"), scratch, user_profile_policy(home))
    out_dir = scratch["readwritePaths"][0]
    command = (
        f"cat {home}/.config/tool/cfg; echo; echo made > {out_dir}/f && echo wrote; "
        f"cat {home}/.ssh/id_rsa || echo no-key"
    )
    result = corral.run({"process": {"commandLine": command}, "filesystem": fs})
    assert result.stdout.splitlines() == ["setting=1", "wrote", "no-key"]
    assert os.stat(out_dir).st_mode & 0o777 == 0o700
