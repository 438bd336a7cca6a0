"""Stand-in of `launch` (see ../README.md): each class records what it is given."""


class Entity:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


class LaunchDescription(Entity):
    @property
    def entities(self):
        return list(self.args[0] if self.args else self.kwargs.get("initial_entities", []))


class LaunchContext:
    """The part of launch.LaunchContext that substitutions read."""

    def __init__(self, launch_configurations):
        self.launch_configurations = dict(launch_configurations)
