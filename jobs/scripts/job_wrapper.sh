# autodl-run job wrapper: runs the worker and records how it ended. POSIX sh (`sh run.sh`).
# client/remote/launcher.py writes it into the job folder as `run.sh`, after `#!/bin/sh` and its
# parameters, each value quoted there (shlex): the file names from jobs.layout.JOB_FILES
# (pid_file state_file exit_code_file log_file path_file), job_env (exports the worker's
# environment) and `set --` the worker's argv.
cd "$(dirname "$0")" || exit 1
# PATH as the launching login shell had it (a long-lived tmux server would hand out its own, older one)
if [ -s "$path_file" ]; then PATH=$(cat "$path_file"); export PATH; fi
job_env
echo $$ > "$pid_file.tmp" && mv -f "$pid_file.tmp" "$pid_file"
echo running > "$state_file.tmp" && mv -f "$state_file.tmp" "$state_file"
rm -f "$exit_code_file"
# A trap (not an ignore: ignored signals would be inherited) lets INT/TERM/HUP hit the worker with
# their usual effect while this shell outlives them long enough to write the exit code.
trap : INT TERM HUP
"$@" >> "$log_file" 2>&1 < /dev/null
code=$?
case "$(head -n 1 "$state_file" 2>/dev/null)" in
  done|failed|cancelled) ;;
  *) if [ "$code" -eq 0 ]; then s=done; else s=failed; fi
     echo "$s" > "$state_file.tmp" && mv -f "$state_file.tmp" "$state_file" ;;
esac
echo "$code" > "$exit_code_file.tmp" && mv -f "$exit_code_file.tmp" "$exit_code_file"
