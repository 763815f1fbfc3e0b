"""The dashboard's pages, one module per area, each a view over engine functions the REST
API also calls; ``add_routes`` of each is called by ``web.app.create_app``."""
