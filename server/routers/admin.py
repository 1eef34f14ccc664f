"""Admin routes (need VBON_ADMIN_KEY): install new adapters now instead of at the next poll."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.errors import error_responses
from server.routers.common import get_gateway
from server.serving import Gateway

router = APIRouter(tags=["admin"])


@router.post("/admin/adapters/reload", responses=error_responses(401, 403, 503))
async def reload_adapters(gateway: Gateway = Depends(get_gateway)) -> dict:
    """Scan the adapters folder; returns what was installed, removed and refused."""
    changes = await gateway.registry.scan()
    return {**changes, "adapters": [v.name for v in gateway.registry.all()]}
