# autodl-run poll (client/remote/follow.py), one round trip: a job folder's state, then a file's new bytes.
# Run as `bash -c SCRIPT poll DIR OFFSET FILE CHUNK STATE EXIT_CODE PID LAUNCH` (the file names from
# jobs.layout.JOB_FILES; OFFSET is 1-based, as tail -c + takes it; FILE is relative to DIR).
# Prints 7 header lines: the folder exists, the first line of STATE and of EXIT_CODE, a pid is recorded,
# it runs, LAUNCH exists, what FILE is (file, other, absent); then at most CHUNK bytes of FILE from OFFSET.
# Every read is of a regular file and bounded: no file on the instance can make it hang or flood the header.
dir=$1 offset=$2 file=$3 chunk=$4 f_state=$5 f_exit=$6 f_pid=$7 f_launch=$8
first() { [ -f "$1" ] && head -c 64 -- "$1" 2>/dev/null | head -n 1 | tr -d '\r\000'; }
cd -- "$dir" 2>/dev/null || { printf '0\n\n\n0\n0\n0\nabsent\n'; exit 0; }
s=$(first "$f_state"); e=$(first "$f_exit"); p=$(first "$f_pid"); a=0; hp=0; l=0; f=absent
# alive: the pid answers and, where /proc exists, runs in this folder (not a zombie a tmux server has
# not reaped yet, not a pid reused since a reboot): the launcher's own test (job_control.sh)
case $p in ""|*[!0-9]*) ;; *) hp=1; kill -0 "$p" 2>/dev/null && { [ ! -e /proc/self/cwd ] || [ /proc/"$p"/cwd -ef . ]; } && a=1 ;; esac
[ -f "$f_launch" ] && l=1
if [ -f "$file" ]; then f=file; elif [ -e "$file" ]; then f=other; fi
printf '1\n%s\n%s\n%s\n%s\n%s\n%s\n' "$s" "$e" "$hp" "$a" "$l" "$f"
[ "$f" = file ] && tail -c +"$offset" -- "$file" 2>/dev/null | head -c "$chunk"
exit 0
