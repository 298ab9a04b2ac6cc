# bash completion for apmatrixctl 0.2.0, generated from its argument parser
# by `apmatrixctl --print-completion bash`: do not edit (tools/gen-ctl-docs rewrites it).
_apmatrixctl() {
    local cur prev cmd="" i bus=() opts="" matrix=0 dirs=0
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --address) bus=(--address "${COMP_WORDS[i+1]}"); ((i++)) ;;
            --system|--session) bus=("${COMP_WORDS[i]}") ;;
            -*) ;;
            *) [[ -z $cmd && ${COMP_WORDS[i-1]} != --print-completion ]] &&
                   cmd=${COMP_WORDS[i]} ;;
        esac
    done
    case $prev in
        --address|--uuid|-a|--adapters|-d|--domains|-c|--control-domains) return ;;
        --print-completion) COMPREPLY=($(compgen -W "bash" -- "$cur")); return ;;
    esac
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "-h --help --address --system --session --json --version --print-completion --print-man list show create remove start stop take-over assign unassign update configure libvirt adapters reserve release check picture monitor import-mdevctl export-mdevctl metrics apply" -- "$cur"))
        return
    fi
    case $cmd in
        list) opts="-h --help --address --system --session --json"; matrix=0; dirs=0 ;;
        show) opts="-h --help --address --system --session --json"; matrix=1; dirs=0 ;;
        create) opts="-h --help --address --system --session --json --uuid -a --adapters -d --domains -c --control-domains --autostart --no-start --no-control-usage-domains"; matrix=0; dirs=0 ;;
        remove) opts="-h --help --address --system --session --json --force --timeout"; matrix=1; dirs=0 ;;
        start) opts="-h --help --address --system --session --json"; matrix=1; dirs=0 ;;
        stop) opts="-h --help --address --system --session --json --force --timeout"; matrix=1; dirs=0 ;;
        take-over) opts="-h --help --address --system --session --json"; matrix=1; dirs=0 ;;
        assign) opts="-h --help --address --system --session --json -a --adapters -d --domains -c --control-domains"; matrix=1; dirs=0 ;;
        unassign) opts="-h --help --address --system --session --json -a --adapters -d --domains -c --control-domains"; matrix=1; dirs=0 ;;
        update) opts="-h --help --address --system --session --json -a --adapters -d --domains -c --control-domains"; matrix=1; dirs=0 ;;
        configure) opts="-h --help --address --system --session --json --name --autostart"; matrix=1; dirs=0 ;;
        libvirt) opts="-h --help --address --system --session --json --nodedev"; matrix=1; dirs=0 ;;
        adapters) opts="-h --help --address --system --session --json"; matrix=0; dirs=0 ;;
        reserve) opts="-h --help --address --system --session --json -a --adapters -d --domains"; matrix=0; dirs=0 ;;
        release) opts="-h --help --address --system --session --json -a --adapters -d --domains"; matrix=0; dirs=0 ;;
        check) opts="-h --help --address --system --session --json -a --adapters -d --domains"; matrix=1; dirs=0 ;;
        picture) opts="-h --help --address --system --session --json"; matrix=1; dirs=0 ;;
        monitor) opts="-h --help --address --system --session --json"; matrix=0; dirs=0 ;;
        import-mdevctl) opts="-h --help --address --system --session --json"; matrix=0; dirs=1 ;;
        export-mdevctl) opts="-h --help --address --system --session --json"; matrix=0; dirs=1 ;;
        metrics) opts="-h --help --address --system --session --json --textfile"; matrix=0; dirs=0 ;;
        apply) opts="-h --help --address --system --session --json --check --prune"; matrix=0; dirs=0 ;;
        *) return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif ((matrix)); then
        local names
        names=$(apmatrixctl "${bus[@]}" --complete-matrices 2>/dev/null)
        COMPREPLY=($(compgen -W "$names" -- "$cur"))
    elif ((dirs)); then
        COMPREPLY=($(compgen -d -- "$cur"))
    fi
}
complete -F _apmatrixctl apmatrixctl
