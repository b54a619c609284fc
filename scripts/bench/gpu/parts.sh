# Sourced by the GPU host scripts: the vLLM 0.26.0 site travels as one zstd tar stream cut into
# parts (.gpu/t16/pNN/part.NN, one per device call, each <= 46 MiB beside the working tree) and
# boot/recv.py, started detached by the first call, unpacks them into /tmp/site as they arrive.
P=/tmp/t16parts

put_part() {  # PART: atomically, so that recv.py never reads a half-copied part
  mkdir -p "$P" && cp ".gpu/t16/p$1/part.$1" "$P/.tmp" && mv "$P/.tmp" "$P/part.$1"
}

start_recv() {  # PART: the first call's part, and the receiver for all of them
  put_part "$1"
  rm -rf /tmp/t16boot && cp -r .gpu/t16/boot /tmp/t16boot
  setsid nohup python3 /tmp/t16boot/recv.py /tmp/t16boot "$P" /tmp/site >/tmp/recv.log 2>&1 </dev/null &
}

wait_site() {  # the last call: wait (<= 180 s) until every part is unpacked and checked
  for _ in $(seq 180); do [ -f /tmp/site/.DONE ] && break; sleep 1; done
  cat /tmp/recv.log
  [ -f /tmp/site/.DONE ] || { echo "site not unpacked"; return 3; }
}
