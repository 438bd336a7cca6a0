from launch import Entity


class OnProcessExit(Entity):
    pass
