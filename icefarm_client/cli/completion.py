"""`icefarm completion bash|zsh`: a completion script made from the parser itself."""

from __future__ import annotations

import argparse

BASH = """# icefarm completion (bash): icefarm completion bash > /etc/bash_completion.d/icefarm
_icefarm() {
    local cur="${COMP_WORDS[COMP_CWORD]}" command="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in -*) ;; *) command="${COMP_WORDS[i]}"; break ;; esac
    done
    case "$command" in
%(cases)s
        *) COMPREPLY=($(compgen -W "%(commands)s %(globals)s" -- "$cur")); return ;;
    esac
}
complete -o default -F _icefarm icefarm
"""

ZSH = """#compdef icefarm
# icefarm completion (zsh). Install: icefarm completion zsh > "${fpath[1]}/_icefarm"
autoload -U +X bashcompinit && bashcompinit
%(bash)s"""


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for action in parser._actions for o in action.option_strings)


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell` ("bash" or "zsh")."""
    commands: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    cases = []
    for name, sub in sorted(commands.items()):
        words = " ".join(_options(sub))
        if name == "completion":
            words += " bash zsh"
        cases.append(f'        {name}) COMPREPLY=($(compgen -W "{words}" -- "$cur")); return ;;')
    bash = BASH % {
        "cases": "\n".join(cases),
        "commands": " ".join(sorted(commands)),
        "globals": " ".join(_options(parser)),
    }
    return bash if shell == "bash" else ZSH % {"bash": bash}
