from launch import Entity


class DeclareLaunchArgument(Entity):
    pass


class ExecuteProcess(Entity):
    pass


class OpaqueFunction(Entity):
    pass


class RegisterEventHandler(Entity):
    pass


class EmitEvent(Entity):
    pass
