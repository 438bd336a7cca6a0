# env.sh - enter the matchanything_ros environment built by tools/setup.sh (`make setup`).
#
#   . /path/to/matchanything_ros/env.sh        (bash, zsh, sh/dash; any working directory)
#
# Sets PATH (venv), LD_LIBRARY_PATH (our message libraries + the ROS wheels' libraries; it must
# be set before Python starts), PYTHONPATH (the source tree first, then the install tree that
# holds the generated matchanything_ros.msg), AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH (install +
# venv, so get_package_share_directory finds us and sensor_msgs), RMW_IMPLEMENTATION, a
# loopback-only ROS_AUTOMATIC_DISCOVERY_RANGE and FASTDDS_DEFAULT_PROFILES_FILE (the shipped
# config/fastdds_large_images.xml, unless one is set). ROS_DOMAIN_ID is left as it is (default 0).
# Sourcing it twice adds nothing twice. Safe under `set -u`.
# On a real ROS 2 install use colcon and `. install/setup.bash` instead (README).

# --- find the checkout from this file's own path
_ma_src=
if [ -n "${BASH_VERSION:-}" ]; then
  # shellcheck disable=SC3028,SC3054
  _ma_src=${BASH_SOURCE[0]:-}
elif [ -n "${ZSH_VERSION:-}" ]; then
  eval '_ma_src=${(%):-%x}'
else
  # POSIX sh has no name for the file being sourced; dash keeps it open while reading it
  for _ma_fd in /proc/$$/fd/*; do
    _ma_f=$(readlink "$_ma_fd" 2>/dev/null || true)
    case "$_ma_f" in */env.sh) [ -f "${_ma_f%/env.sh}/tools/setup.sh" ] && _ma_src=$_ma_f ;; esac
  done
  [ -n "$_ma_src" ] || { [ -f "$PWD/env.sh" ] && [ -f "$PWD/tools/setup.sh" ] && _ma_src=$PWD/env.sh; }
fi
if [ -n "${MATCHANYTHING_ROOT:-}" ] && [ -f "$MATCHANYTHING_ROOT/tools/setup.sh" ]; then
  _ma_root=$MATCHANYTHING_ROOT
elif [ -n "$_ma_src" ]; then
  _ma_root=$(cd "$(dirname "$_ma_src")" && pwd)
else
  _ma_root=
fi

if [ -z "$_ma_root" ] || [ ! -f "$_ma_root/tools/setup.sh" ]; then
  echo "env.sh: cannot tell where the matchanything_ros checkout is; set MATCHANYTHING_ROOT=/path/to/it" >&2
  unset _ma_src _ma_fd _ma_f _ma_root
  return 1 2>/dev/null || exit 1
fi
if [ ! -x "$_ma_root/.venv/bin/python" ] || [ ! -d "$_ma_root/install/share/matchanything_ros" ]; then
  echo "env.sh: $_ma_root is not set up yet; run \`make setup\` (tools/setup.sh) there first" >&2
fi

_ma_prepend() {  # _ma_prepend VAR DIR: put DIR in front of the colon list VAR unless it is there
  eval "_ma_cur=\${$1:-}"
  case ":$_ma_cur:" in
    *":$2:"*) ;;
    *) eval "$1=\"\$2\${_ma_cur:+:\$_ma_cur}\"" ;;
  esac
  eval "export $1"
  unset _ma_cur
}
export MATCHANYTHING_ROOT="$_ma_root"
_ma_venv=$_ma_root/.venv
_ma_site=lib/python3.11/site-packages

_ma_prepend PATH "$_ma_venv/bin"

# Libraries: what ros_wheels_bootstrapper would add when a venv Python starts (the venv's lib/
# and site-packages/ros_*.libs), plus install/lib (our generated typesupport libraries). All are
# set here, so the bootstrapper's re-exec of every Python start is switched off by its own guard.
# (no glob loop: zsh aborts on a glob without matches)
_ma_libs=$(find "$_ma_venv/$_ma_site" -maxdepth 1 -type d -name 'ros_*.libs' 2>/dev/null | sort)
while IFS= read -r _ma_d; do
  [ -n "$_ma_d" ] && _ma_prepend LD_LIBRARY_PATH "$_ma_d"
done <<_MA_EOF
$_ma_libs
_MA_EOF
_ma_prepend LD_LIBRARY_PATH "$_ma_venv/lib"
_ma_prepend LD_LIBRARY_PATH "$_ma_root/install/lib"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1

# Python: the source tree wins; the install tree supplies the generated matchanything_ros.msg
# (matchanything_ros/__init__.py extends its __path__ over both).
_ma_prepend PYTHONPATH "$_ma_root/install/$_ma_site"
_ma_prepend PYTHONPATH "$_ma_root"

_ma_prepend AMENT_PREFIX_PATH "$_ma_venv"
_ma_prepend AMENT_PREFIX_PATH "$_ma_root/install"
_ma_prepend CMAKE_PREFIX_PATH "$_ma_venv"
_ma_prepend CMAKE_PREFIX_PATH "$_ma_root/install"

export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
# Camera-sized images over best-effort DDS: a 32 MiB shared-memory segment (docs/node.md, "Transport").
# Every process started from this shell (camera driver, node, tools) uses it; a profile already set wins.
if [ -z "${FASTDDS_DEFAULT_PROFILES_FILE:-}" ] && [ -f "$_ma_root/config/fastdds_large_images.xml" ]; then
  export FASTDDS_DEFAULT_PROFILES_FILE="$_ma_root/config/fastdds_large_images.xml"
fi
# Loopback only: otherwise Fast DDS sends discovery multicast on every interface of the machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST

unset _ma_src _ma_fd _ma_f _ma_root _ma_venv _ma_site _ma_d _ma_libs
unset -f _ma_prepend 2>/dev/null || true
