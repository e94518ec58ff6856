# autodl-run job control (client/remote/launcher.py), one round trip: launch, look at or cancel the
# process of a job folder, then print the folder's status after MARK (launcher.parse_status reads it).
# Run as `bash -c SCRIPT job-control ARGS...`:
#   MODE DIR MARK PID STATE EXIT_CODE LOG LAUNCH WRAPPER WRAPPER_PATH [the mode's own]
#   launch SOCKET SESSION PREFER_TMUX TICKS START_S   stdin: the wrapper, written to WRAPPER
#   status
#   cancel SOCKET SESSION INT_TICKS TERM_TICKS
# The file names come from jobs.layout.JOB_FILES; DIR may start with ~ (this user's home).
# Exit codes of launch: 2 no folder, 3 a job already runs there, 4 neither tmux nor setsid,
# 5 the job did not start in time, 6 tmux or setsid failed.
mode=$1 dir=$2 mark=$3 f_pid=$4 f_state=$5 f_exit=$6 f_log=$7 f_launch=$8 f_wrapper=$9 f_path=${10}
shift 10
case $dir in
  "~") dir=$HOME ;;
  "~/"*) dir=$HOME/${dir#"~/"} ;;
esac

# The first line of a small regular file, at most 64 bytes: the instance's files are data (a FIFO or
# /dev/zero in their place must not hang or flood this).
first() { [ -f "$1" ] && head -c 64 -- "$1" 2>/dev/null | head -n 1 | tr -d '\r\000'; }
# alive: the pid answers and, where /proc exists, still runs in this job folder (a pid from
# before a reboot may belong to anything now). jobs.jobstate.resolve turns the status into the state.
alive() { case $p in ""|*[!0-9]*) return 1 ;; esac; kill -0 "$p" 2>/dev/null && { [ ! -e /proc/self/cwd ] || [ /proc/"$p"/cwd -ef . ]; }; }
# exists, state, exit code, pid, alive, launching (launch.json is there)
status() {
  a=0; alive && a=1; l=0; [ -e "$f_launch" ] && l=1
  printf '%s\n1\n%s\n%s\n%s\n%s\n%s\n' "$mark" "$(first "$f_state")" \
    "$(first "$f_exit")" "$p" "$a" "$l"
}
missing() { printf '%s\n0\n' "$mark"; exit 0; }
wait_gone() { i=0; while alive && [ $i -lt "$1" ]; do sleep 0.1; i=$((i+1)); done; }

launch() {
  local socket=$1 session=$2 prefer_tmux=$3 ticks=$4 start_s=$5
  case $f_wrapper in ''|-*|*[!A-Za-z0-9._-]*) echo "bad wrapper name: $f_wrapper" >&2; exit 2 ;; esac
  unset TMUX TMUX_PANE
  mkdir -p -- "$dir" && cd -- "$dir" || exit 2
  p=$(first "$f_pid")
  if alive; then echo "a job is already running there (pid $p)" >&2; exit 3; fi
  rm -f -- "$f_pid" "$f_exit" "$f_state"
  (umask 077; cat > "$f_wrapper" && printf '%s' "$PATH" > "$f_path") || exit 2
  if [ "$prefer_tmux" = 1 ] && command -v tmux >/dev/null 2>&1; then
    # -f /dev/null: a server of our own socket ignores the user's ~/.tmux.conf.
    # tmux expands formats (#{..}, #(command)) in -c: ## keeps a # in the folder's name a #.
    tmux -L "$socket" -f /dev/null new-session -d -s "$session" -c "${PWD//#/##}" "exec sh ./$f_wrapper" || exit 6
  elif setsid -f true >/dev/null 2>&1; then
    # -f forks here, so INT is not ignored in the job the way it is for a `&` job of a script
    setsid -f nohup sh ./"$f_wrapper" >/dev/null 2>&1 </dev/null || exit 6
  elif command -v setsid >/dev/null 2>&1; then
    # an older setsid (no -f): a background job, under job control (set -m), as a `&` job of a
    # script ignores INT for good (no shell can trap a signal ignored when it started)
    set -m
    setsid nohup sh ./"$f_wrapper" >/dev/null 2>&1 </dev/null &
    set +m
  else
    echo "neither tmux nor setsid is installed" >&2; exit 4
  fi
  i=0
  while [ ! -s "$f_pid" ] && [ $i -lt "$ticks" ]; do sleep 0.1; i=$((i+1)); done
  if [ ! -s "$f_pid" ]; then
    echo "the job did not start within $start_s s" >&2; tail -n 20 "$f_log" >&2 2>/dev/null; exit 5
  fi
  p=$(first "$f_pid")
  status
}

# INT, then TERM, then KILL to the job's process group; `cancelled` is written first, so the wrapper keeps it
cancel() {
  local socket=$1 session=$2 int_ticks=$3 term_ticks=$4
  cd -- "$dir" 2>/dev/null || missing
  p=$(first "$f_pid")
  if alive; then
    echo cancelled > "$f_state.tmp" && mv -f "$f_state.tmp" "$f_state"
    kill -s INT -- "-$p" 2>/dev/null || kill -s INT "$p" 2>/dev/null || true
    wait_gone "$int_ticks"
    if alive; then kill -s TERM -- "-$p" 2>/dev/null || kill -s TERM "$p" 2>/dev/null || true; wait_gone "$term_ticks"; fi
    if alive; then
      kill -s KILL -- "-$p" 2>/dev/null || kill -s KILL "$p" 2>/dev/null || true
      wait_gone 20
      [ -s "$f_exit" ] || echo 137 > "$f_exit"
    fi
  fi
  if command -v tmux >/dev/null 2>&1; then tmux -L "$socket" kill-session -t "=$session" >/dev/null 2>&1 || true; fi
  status
}

case $mode in
  launch) launch "$@" ;;
  cancel) cancel "$@" ;;
  status) cd -- "$dir" 2>/dev/null || missing; p=$(first "$f_pid"); status ;;
  *) echo "job_control.sh: unknown mode $mode" >&2; exit 2 ;;
esac
