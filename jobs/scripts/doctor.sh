# autodl-run doctor (client/doctor.py), one round trip: prints sections (@@NAME) that client.doctor
# parses. The python's own report is remote_worker.envprobe, from the worker bundle.
# Arguments: PYTHON BUNDLE_DIR DATA_DISK AUTODL_FS EXTRA_DIR NETWORK_TURBO PIP_URL HF_URL USE_TURBO
#            NET_TIMEOUT_S CANDIDATE...  (EXTRA_DIR, PIP_URL, HF_URL may be "")
py=$1 bundle=$2 data_disk=$3 autodl_fs=$4 extra=$5 turbo_file=$6 pip_url=$7 hf_url=$8 use_turbo=$9
timeout=${10}
shift 10
echo "@@clock $(date +%s.%N)"
echo "@@os"
( . /etc/os-release 2>/dev/null && echo "$PRETTY_NAME" ) || echo unknown
uname -srm
p=$(command -v "$py" 2>/dev/null)
echo "@@python"
echo "path=$p"
echo "conda_prefix=${CONDA_PREFIX:-}"
echo "conda_env=${CONDA_DEFAULT_ENV:-}"
echo "conda=$(command -v conda 2>/dev/null)"
for c in "$@"; do [ -x "$c" ] && echo "candidate=$c"; done
echo "@@pyinfo"
[ -n "$p" ] && PYTHONPATH=$bundle timeout 120 "$py" -m remote_worker.envprobe --torch 2>/dev/null </dev/null | tail -n 1
echo "@@gpu"
command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader,nounits 2>&1
echo "@@disks"
for d in / "$data_disk" "$autodl_fs" ${extra:+"$extra"}; do
  [ -d "$d" ] || continue
  echo "$d|$(df -Pk "$d" 2>/dev/null | tail -n 1)|$(df -Pi "$d" 2>/dev/null | tail -n 1)"
done
echo "@@tools"
for t in tmux rsync; do echo "$t=$(command -v $t 2>/dev/null)|$($t -V 2>/dev/null | head -n 1)"; done
turbo=0; [ -r "$turbo_file" ] && turbo=1
echo "@@turbo $turbo"
[ -z "$pip_url" ] && [ -n "$p" ] && pip_url=$(timeout 20 "$py" -m pip config get global.index-url 2>/dev/null | tail -n 1)
[ -z "$pip_url" ] && pip_url=${PIP_INDEX_URL:-https://pypi.org/simple}
[ -z "$hf_url" ] && hf_url=${HF_ENDPOINT:-https://huggingface.co}
echo "@@urls"
echo "pip=$pip_url"
echo "hf=$hf_url"
tmp=$(mktemp -d)
probe() {  # URL, 1 = through network_turbo -> "HTTP-CODE SECONDS"
  (
    if [ "$2" = 1 ]; then . "$turbo_file" >/dev/null 2>&1; fi
    if command -v curl >/dev/null 2>&1; then
      curl -s -o /dev/null -m "$timeout" -w '%{http_code} %{time_total}' "$1"
    elif [ -n "$p" ]; then
      PYTHONPATH=$bundle "$py" -m remote_worker.envprobe --http "$1" --timeout "$timeout"
    else
      echo "000 0"
    fi
  ) 2>/dev/null
}
probe "${pip_url%/}/pip/" "$use_turbo" > "$tmp/pip" &
probe "$hf_url" "$use_turbo" > "$tmp/hf" &
if [ $turbo = 1 ] && [ "$use_turbo" = 0 ]; then
  probe "${pip_url%/}/pip/" 1 > "$tmp/pip_turbo" &
  probe "$hf_url" 1 > "$tmp/hf_turbo" &
fi
wait
echo "@@net"
for f in pip hf pip_turbo hf_turbo; do [ -f "$tmp/$f" ] && echo "$f=$(cat "$tmp/$f")"; done
rm -rf "$tmp"
