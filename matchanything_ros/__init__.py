"""matchanything_ros: the MatchAnything matcher (ELoFTR and RoMa variants) for ROS 2.

The matcher core (`matchanything_ros.core`) knows nothing of ROS; the ROS layer lives in
`matchanything_ros.ros`. Generated message classes live in `matchanything_ros.msg`, which
rosidl installs into the build prefix: `extend_path` lets a source checkout find them there.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
