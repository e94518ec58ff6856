# autodl-run set-up probe (client/setup.py), one round trip: which tools the instance has, then
# set-up's marker if it is there, else what the python has (remote_worker.envprobe, from the bundle).
# Arguments: APT_FAILED MARKER PYTHON BUNDLE_DIR REQUIREMENTS_JSON CANDIDATE... (MARKER "": always probe)
home() {  # a path as the user wrote it: ~ is the remote home
  case $1 in
    "~") printf %s "$HOME" ;;
    "~/"*) printf %s "$HOME/${1#"~/"}" ;;
    *) printf %s "$1" ;;
  esac
}
apt_failed=$(home "$1") marker=$(home "$2") py=$(home "$3") bundle=$(home "$4") reqs=$5
shift 5
t=0; command -v tmux >/dev/null 2>&1 && t=1
r=0; command -v rsync >/dev/null 2>&1 && r=1
a=0; command -v apt-get >/dev/null 2>&1 && a=1
f=0; [ -e "$apt_failed" ] && f=1
echo "@@tools $t $r $a $f $(id -u)"
if [ -n "$marker" ] && [ -f "$marker" ]; then echo @@marker; cat "$marker"; exit 0; fi
echo @@probe
PYTHONPATH=$bundle "$py" -m remote_worker.envprobe --requirements "$reqs" </dev/null
rc=$?
if [ $rc -ne 0 ]; then
  echo @@candidates
  for p in "$@"; do [ -x "$p" ] && echo "$p"; done
fi
exit $rc
