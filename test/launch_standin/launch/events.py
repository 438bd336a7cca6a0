from launch import Entity


class Shutdown(Entity):
    pass
