"""The SFU controller: removes LiveKit ghosts, closes memberless rooms, one leader acts.

Every ``interval`` seconds, and at once when the Matrix source pushes news (a joined
account's /sync) or a participant's grace runs out, the acting controller (see
:mod:`sfu.controller.leader`) lists LiveKit's rooms and participants, reads the grants the
service recorded (:mod:`sfu.controller.registry`) and what the source shows of the Matrix
rooms involved (:mod:`sfu.controller.matrix_source`, :mod:`sfu.controller.sync_source`),
and lets :class:`~sfu.controller.ghosts.GhostJudge` decide. A participant due for removal
is removed with LiveKit's RemoveParticipant; an empty LiveKit room whose Matrix room shows
no call member ``room_grace`` after its creation and its last token is deleted. Every
action is claimed first (never taken twice), written as one audit log line (logger
``sfu.audit``) and counted in ``/metrics``.

At start-up it says what it cannot see and therefore will not act on (no Redis, no
homeserver access, a refused token), then runs with what it has.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from livekit import api as lkapi
from livekit.protocol import models as lkmodels

from matrixrtc.tasks import OwnedTasks
from sfu.common import metrics
from sfu.controller.config import ControllerConfig
from sfu.controller.ghosts import Finding, GhostJudge, Participant, Reason, RoomView, Verdict
from sfu.controller.ghosts import room_view as make_room_view
from sfu.controller.leader import Leadership, LocalLeadership, RedisLeadership
from sfu.controller.matrix_source import AdminStateSource, MatrixSource
from sfu.controller.registry import Grant, GrantRegistry, MemoryRegistry, RedisRegistry
from sfu.controller.sync_source import SyncAndAdminSource, SyncSource

__all__ = ["STATUS_KEY", "Controller", "build_controller"]

log = structlog.get_logger(__name__)
audit = structlog.get_logger("sfu.audit")

STATUS_KEY = "matrixrtc-sfu:controller:status"
FAILURE_KEY = "matrixrtc-sfu:controller:homeserver-failed-at"
_FAILURE_TTL = 3600
_MIN_SPACING = 0.05  # seconds between two cycles, however much news arrives
_AVERTED_S = 5.0  # a removal the current state contradicted is re-checked after this long
_DOUBT_S = 60.0  # a participant the source could not confirm memberless is left alone this long
_STANDARD = lkmodels.ParticipantInfo.Kind.STANDARD
# Removals on Matrix evidence: re-checked against the resolved current state first.
_MATRIX_REASONS = frozenset(
    {
        Reason.CALL_ENDED,
        Reason.LEFT_ROOM,
        Reason.KICKED,
        Reason.BANNED,
        Reason.NOT_IN_ROOM,
        Reason.NO_MEMBERSHIP,
    }
)


@dataclass
class _RoomResult:
    room: str
    findings: list[Finding] = field(default_factory=list)
    matrix_rooms: dict[str, int | None] = field(default_factory=dict)  # → active members
    closed: bool = False


class Controller:
    """See the module docstring. ``run_cycle`` is one pass; ``start`` loops it."""

    def __init__(
        self,
        config: ControllerConfig,
        registry: GrantRegistry,
        *,
        registry_complete: bool,
        source: MatrixSource | None,
        leadership: Leadership,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (wall seconds) dates grants and memberships; ``monotonic`` times the
        cycles and how long a contradicted removal or a doubt is held."""
        self.config = config
        self.registry = registry
        self.registry_complete = registry_complete
        self.source = source
        self.leadership = leadership
        self._clock = clock
        self._monotonic = monotonic
        self.judge = GhostJudge(
            grace=config.grace,
            join_grace=config.join_grace,
            require_membership=config.require_membership,
            allow_identities=config.allow_identities,
            burst_count=config.burst_count,
            burst_window=config.burst_window,
            burst_grace=config.burst_grace,
        )
        self._registry_since = 0.0
        self.limits: list[str] = []  # what this controller cannot see, in plain words
        self._session: aiohttp.ClientSession | None = None
        self._api: lkapi.LiveKitAPI | None = None
        self._tasks = OwnedTasks("controller", log, event_prefix="controller")
        self._status: dict[str, Any] = {}
        self._status_redis: Any = None
        self._matrix_visible = source is not None
        self._doubts: dict[str, float] = {}  # sid → monotonic time until which we keep it
        self._averted: dict[str, float] = {}  # sid → monotonic time of the next re-check
        self._shared_failure = 0.0  # newest homeserver failure any replica saw (wall s)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._api = lkapi.LiveKitAPI(
            self.config.livekit_url,
            self.config.key,
            self.config.secret,
            session=self._session,
            failover=False,
        )
        if self.config.redis_url:
            import redis.asyncio as aioredis

            self._status_redis = aioredis.Redis.from_url(
                self.config.redis_url, socket_timeout=2, socket_connect_timeout=2
            )
        await self._report_capabilities()
        await self.leadership.start()
        self._tasks.spawn(self._loop(), "cycles")

    async def close(self) -> None:
        """Stop the cycles and close what it opened; a failure of its loop (logged when it
        happened) is raised once everything is closed."""
        try:
            await self._tasks.aclose()
        finally:
            await self.leadership.close()
            if self.source is not None:
                await self.source.close()
            if self._api is not None:
                await self._api.aclose()
            if self._session is not None:
                await self._session.close()
            if self._status_redis is not None:
                await self._status_redis.aclose()

    async def _report_capabilities(self) -> None:
        cfg = self.config
        limits: list[str] = []
        if not cfg.redis_url:
            limits.append(
                "no LIVEKIT_REDIS_URL: no leader election (run exactly one controller) and "
                "grants are known only inside this process"
            )
        if not self.registry_complete:
            limits.append(
                "the grant registry is incomplete here (no shared Redis), so participants "
                "whose identity the service never issued are NOT removed"
            )
        if self.source is None:
            limits.append(
                "no homeserver access (MATRIXRTC_SFU_CONTROLLER_HOMESERVER_URL with an ADMIN "
                "or ACCESS token): Matrix room state is invisible, so members who left the "
                "call, left or were banned from the room are NOT removed and rooms are NOT "
                "closed; only a delayed leave found gone by the service is acted on"
            )
        else:
            await self.source.start()
            check = await self.source.probe()
            if check.ok:
                log.info("controller reads Matrix room state", source=check.message)
            else:
                limits.append(
                    f"homeserver access failed at start-up ({check.message}): rooms that "
                    "cannot be read are treated as unknown and nothing Matrix-based is done "
                    "there"
                )
        if isinstance(self.source, SyncAndAdminSource):
            limits.append(
                "rooms the controller account has not joined are read through the Synapse "
                "admin API, which cannot see MSC4354 sticky memberships: there members with "
                "only a sticky membership are never removed for having none, and their "
                "sticky leave is NOT seen (invite the account to those rooms)"
            )
        if isinstance(self.source, AdminStateSource):
            limits.append(
                "the Synapse admin room-state API cannot see MSC4354 sticky memberships "
                "(org.matrix.msc4143.rtc.member, Element Call's matrix_2_0 mode): members "
                "with only a sticky membership are never removed for having no membership, "
                "and their sticky leave is NOT seen (give the controller a joined account, "
                "MATRIXRTC_SFU_CONTROLLER_ACCESS_TOKEN, to see them)"
            )
        if isinstance(self.source, SyncSource | SyncAndAdminSource):
            log.info(
                "sticky memberships are read from /sync; Megolm-encrypted ones cannot be: "
                "their senders are never removed for having no membership"
            )
        if cfg.require_membership:
            log.info(
                "participants without a call membership where memberships are readable are "
                "removed after the join grace",
                join_grace=cfg.join_grace,
            )
        if cfg.dry_run:
            limits.append("dry run: removals and room closes are only logged and counted")
        for line in limits:
            log.warning("controller limitation", detail=line)
        self.limits = limits
        log.info(
            "controller started",
            interval=cfg.interval,
            grace=cfg.grace,
            join_grace=cfg.join_grace,
            room_grace=cfg.room_grace,
            kick_foreign=cfg.kick_foreign and self.registry_complete,
            leader_election=isinstance(self.leadership, RedisLeadership),
            instance=self.leadership.id,
        )

    async def _loop(self) -> None:
        failures = 0
        while True:
            started = self._monotonic()
            wait = self.config.interval
            if self.leadership.is_leader():
                try:
                    results = await self.run_cycle()
                    wait = self._next_wait(results)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    metrics.CONTROLLER_ERRORS.labels("cycle").inc()
                    failures += 1
                    if failures == 1:
                        log.exception("controller cycle failed")
                    elif failures % 60 == 0:
                        log.error(
                            "controller cycles still failing",
                            count=failures,
                            reason=repr(exc)[:200],
                        )
                metrics.CONTROLLER_CYCLE.observe(self._monotonic() - started)
            else:
                await self._share_failure()
            wait = max(_MIN_SPACING, wait - (self._monotonic() - started))
            if self.source is not None:
                if await self.source.wait_changed(wait):
                    await asyncio.sleep(_MIN_SPACING)  # let a burst of events land together
            else:
                await asyncio.sleep(wait)

    def _next_wait(self, results: list[_RoomResult]) -> float:
        """Seconds to the next cycle: the interval, or sooner when a watched participant's
        removal falls due before it."""
        now = self._clock()
        dues = [
            f.due_at - now
            for r in results
            for f in r.findings
            if f.verdict is Verdict.WATCH and f.due_at is not None
        ]
        return min([self.config.interval, *(d + 0.01 for d in dues)])

    # -- one cycle ---------------------------------------------------------------------

    @property
    def api(self) -> lkapi.LiveKitAPI:
        if self._api is None:
            raise RuntimeError("controller not started")
        return self._api

    async def run_cycle(self) -> list[_RoomResult]:
        await self._share_failure()
        now = self._clock()
        rooms = (await self.api.room.list_rooms(lkapi.ListRoomsRequest())).rooms
        since = await self.registry.since()
        self._registry_since = since if self.registry_complete else float("inf")
        views: dict[str, asyncio.Task[RoomView | None]] = {}
        # The state reads this cycle shares between its rooms; none outlives the cycle. A
        # failed read is the failure of each room that awaited it (counted below).
        reads = OwnedTasks("controller cycle", log, event_prefix="controller.view")
        try:
            results = await asyncio.gather(
                *(self._room(r, since, views, reads, now) for r in rooms),
                return_exceptions=True,
            )
        finally:
            await reads.cancel()
        out: list[_RoomResult] = []
        live: list[str] = []
        for room, res in zip(rooms, results, strict=True):
            if isinstance(res, BaseException):
                metrics.CONTROLLER_ERRORS.labels("room").inc()
                log.warning("controller room step failed", room=room.name, reason=repr(res)[:200])
                continue
            out.append(res)
            live.extend(f.participant.sid for f in res.findings)
        self.judge.forget_except(live)
        await self._publish_status(out, now)
        return out

    async def _view(self, matrix_room: str, now: float) -> RoomView | None:
        if self.source is None:
            return None
        snap = await self.source.room(matrix_room)
        if snap is None:
            return None
        return make_room_view(snap.state, int(now * 1000), sticky=snap.sticky)

    async def _room(
        self,
        room: lkmodels.Room,
        since: float,
        views: dict[str, asyncio.Task[RoomView | None]],
        reads: OwnedTasks,
        now: float,
    ) -> _RoomResult:
        result = _RoomResult(room.name)
        grants = await self.registry.room_grants(room.name)
        # ListRooms' num_participants lags behind joins: always ask for the participants.
        parts = await self._participants(room.name)
        matrix_rooms = {g.matrix_room for g in grants.values()}
        for mr in matrix_rooms:  # one state read per Matrix room per cycle
            if mr not in views:
                views[mr] = reads.spawn(self._view(mr, now), f"view {mr}")
        room_views = {mr: await views[mr] for mr in matrix_rooms}
        for mr, v in room_views.items():
            result.matrix_rooms[mr] = None if v is None else v.active_members()
        ended = await self.registry.ended(room.name) if parts and grants else {}
        if parts:
            result.findings = self.judge.observe(
                parts,
                grants,
                room_views,
                registry_since=since if self.registry_complete else float("inf"),
                ended_hints=ended,
                now=now,
                patient_until=self._patient_until(),
            )
            if grants:
                await self.registry.touch(room.name)
        for f in result.findings:
            if f.verdict is Verdict.REMOVE:
                await self._remove(room.name, f, now)
        if not parts and grants:
            result.closed = await self._maybe_close(room, grants, room_views, now)
        return result

    def _patient_until(self) -> float:
        failed = self.source.last_failure if self.source is not None else 0.0
        failed = max(failed, self._shared_failure)
        return failed + self.config.outage_grace if failed else 0.0

    async def _share_failure(self) -> None:
        """Keep the newest homeserver failure any replica saw in Redis, so a controller that
        starts (or takes over) just after an outage is as patient as one that saw it."""
        if self._status_redis is None:
            return
        mine = self.source.last_failure if self.source is not None else 0.0
        try:
            raw = await self._status_redis.get(FAILURE_KEY)
            shared = float(raw) if raw is not None else 0.0
            if mine > shared:
                await self._status_redis.set(FAILURE_KEY, repr(mine), ex=_FAILURE_TTL)
            self._shared_failure = max(shared, mine)
        except Exception as exc:  # Redis trouble: keep what we knew, the cycle goes on
            log.debug("homeserver failure time not shared", reason=str(exc)[:200])

    async def _remove(self, room: str, f: Finding, now: float) -> None:
        p = f.participant
        if f.reason is Reason.FOREIGN_TOKEN and not self.config.kick_foreign:
            return
        try:  # the identity may have reconnected since the listing: judge that one anew
            current = await self.api.room.get_participant(
                lkapi.RoomParticipantIdentity(room=room, identity=p.identity)
            )
        except lkapi.TwirpError as exc:
            if exc.code == "not_found":
                return
            raise
        if current.sid != p.sid:
            return
        if f.reason is Reason.NO_MEMBERSHIP and not await self._confirmed_memberless(f):
            return
        if f.reason in _MATRIX_REASONS and not await self._still_bad(room, f, now):
            return
        if not await self.leadership.claim(f"kick:{room}:{p.sid}"):
            return
        g = f.grant
        fields: dict[str, object] = {
            "action": "remove_participant",
            "reason": f.reason.value,
            "room": room,
            "identity": p.identity,
            "sid": p.sid,
            "joined_at": p.joined_at,
            "bad_since": f.bad_since,
            "seconds_after_evidence": round(now - (f.bad_since or now), 3),
            "burst": self.judge.in_burst(p.sid),
            "dry_run": self.config.dry_run,
            "instance": self.leadership.id,
        }
        if g is not None:
            fields.update(matrix_room=g.matrix_room, user_id=g.user_id, device_id=g.device_id)
        if not self.config.dry_run:
            try:
                await self.api.room.remove_participant(
                    lkapi.RoomParticipantIdentity(room=room, identity=p.identity)
                )
            except lkapi.TwirpError as exc:
                if exc.code != "not_found":
                    metrics.CONTROLLER_ERRORS.labels("remove").inc()
                    log.warning("RemoveParticipant failed", room=room, reason=str(exc)[:200])
                    return
                fields["result"] = "already_gone"
        metrics.GHOST_KICKS.labels(f.reason.value).inc()
        audit.warning("ghost removed", **fields)

    async def _still_bad(self, room: str, f: Finding, now: float) -> bool:
        """The last look before a removal on Matrix evidence: the room's resolved current
        state read from the homeserver now (not the stream the view was built from) must
        still give a reason to remove. Guards against a stream that disagrees with state
        resolution (a re-join that won after a fork, a state reset). Unreadable: not now."""
        g = f.grant
        if g is None or self.source is None:
            return True  # only a delayed-leave job's word, nothing to re-read
        sid = f.participant.sid
        if self._averted.get(sid, 0.0) > self._monotonic():
            return False  # the homeserver disagreed a moment ago: ask again later
        fresh = await self.source.current_state(g.matrix_room)
        if fresh is None:
            log.info(
                "removal postponed: current state unreadable",
                identity=f.participant.identity,
                matrix_room=g.matrix_room,
            )
            return False
        snap = await self.source.room(g.matrix_room)
        view = make_room_view(
            fresh, int(now * 1000), sticky=snap.sticky if snap is not None else None
        )
        ended = await self.registry.ended(room)
        reason = self.judge.reason_now(
            f.participant,
            g,
            view,
            registry_since=self._registry_since,
            ended_hint=ended.get(f.participant.identity),
        )
        if reason in _MATRIX_REASONS:
            return True
        self._averted[sid] = self._monotonic() + _AVERTED_S
        if len(self._averted) > 10_000:
            self._averted = {k: v for k, v in self._averted.items() if v > self._monotonic()}
        metrics.CONTROLLER_AVERTED.inc()
        log.warning(
            "not removed: the homeserver's current state disagrees with the stream",
            identity=f.participant.identity,
            user_id=g.user_id,
            device_id=g.device_id,
            matrix_room=g.matrix_room,
            stream_reason=f.reason.value,
            current_state_reason=reason.value,
        )
        return False

    async def _confirmed_memberless(self, f: Finding) -> bool:
        """Before a ``no_membership`` removal, ask the source once more (a sticky membership
        the stream missed would otherwise cost an honest member its call); a doubt holds
        for ``_DOUBT_S``, so a doubtful participant costs one request per that period."""
        g, sid = f.grant, f.participant.sid
        if g is None or self.source is None:
            return False
        now = self._monotonic()
        if self._doubts.get(sid, 0.0) > now:
            return False
        if not await self.source.may_hold_membership(g.matrix_room, g.user_id, g.device_id):
            return True
        self._doubts[sid] = now + _DOUBT_S
        if len(self._doubts) > 10_000:
            self._doubts = {k: v for k, v in self._doubts.items() if v > now}
        metrics.CONTROLLER_DOUBTS.inc()
        log.warning(
            "not removed: the homeserver may hold a sticky membership the controller did not see",
            identity=f.participant.identity,
            user_id=g.user_id,
            device_id=g.device_id,
            matrix_room=g.matrix_room,
        )
        return False

    async def _maybe_close(
        self,
        room: lkmodels.Room,
        grants: Mapping[str, Grant],
        views: Mapping[str, RoomView | None],
        now: float,
    ) -> bool:
        if any(v is None for v in views.values()) or not views:
            return False  # cannot see every Matrix room: never close on ignorance
        if not all(
            (v := views.get(g.matrix_room)) is not None and v.sticky_readable(g.user_id)
            for g in grants.values()
        ):
            return False  # a sticky membership could exist unseen (LiveKit's own empty timeout)
        if any(v.active_members() > 0 for v in views.values() if v is not None):
            return False
        created = float(room.creation_time_ms) / 1000 if room.creation_time_ms else 0.0
        created = created or float(room.creation_time)
        last_token = max(g.issued_at for g in grants.values())
        if now - max(created, last_token) < self.config.room_grace:
            return False
        if await self._participants(room.name):
            return False  # someone joined meanwhile
        if not await self.leadership.claim(f"close:{room.name}:{room.sid}"):
            return False
        if not self.config.dry_run:
            try:
                await self.api.room.delete_room(lkapi.DeleteRoomRequest(room=room.name))
            except lkapi.TwirpError as exc:
                if exc.code != "not_found":
                    metrics.CONTROLLER_ERRORS.labels("close").inc()
                    log.warning("DeleteRoom failed", room=room.name, reason=str(exc)[:200])
                    return False
        metrics.ROOMS_CLOSED.inc()
        audit.warning(
            "room closed",
            action="delete_room",
            reason="no_matrix_members",
            room=room.name,
            matrix_rooms=sorted(views),
            dry_run=self.config.dry_run,
            instance=self.leadership.id,
        )
        return True

    async def _participants(self, room: str) -> list[Participant]:
        listed = await self.api.room.list_participants(lkapi.ListParticipantsRequest(room=room))
        return [_participant(p) for p in listed.participants]

    # -- /status -------------------------------------------------------------------------

    async def _publish_status(self, results: list[_RoomResult], now: float) -> None:
        rooms = []
        for r in results:
            parts = []
            for f in r.findings:
                g = f.grant
                parts.append(
                    {
                        "identity": f.participant.identity,
                        "sid": f.participant.sid,
                        "joined_at": f.participant.joined_at,
                        "user_id": g.user_id if g else None,
                        "device_id": g.device_id if g else None,
                        "matrix_room": g.matrix_room if g else None,
                        "matrix_state": f.reason.value,
                        "verdict": f.verdict.value,
                        "due_in": round(f.due_at - now, 2) if f.due_at is not None else None,
                    }
                )
            rooms.append(
                {
                    "room": r.room,
                    "matrix_rooms": [
                        {"room_id": mr, "active_call_members": n}
                        for mr, n in sorted(r.matrix_rooms.items())
                    ],
                    "participants": parts,
                    "closed": r.closed,
                }
            )
        self._status = {
            "instance": self.leadership.id,
            "leader": True,
            "at": now,
            "limitations": self.limits,
            "rooms": rooms,
        }
        if self._status_redis is not None:
            try:
                await self._status_redis.set(
                    STATUS_KEY, json.dumps(self._status), ex=max(10, int(self.config.interval * 5))
                )
            except Exception as exc:
                log.debug("status not published", reason=str(exc)[:200])

    async def status(self) -> dict[str, Any]:
        """The newest snapshot: ours when we lead, else the leader's (from Redis)."""
        if self.leadership.is_leader() and self._status:
            return self._status
        if self._status_redis is not None:
            raw = await self._status_redis.get(STATUS_KEY)
            if raw is not None:
                snap: dict[str, Any] = json.loads(raw)
                snap["leader"] = snap.get("instance") == self.leadership.id
                snap["served_by"] = self.leadership.id
                return snap
        return {
            "instance": self.leadership.id,
            "leader": False,
            "limitations": self.limits,
            "rooms": None,
            "error": "no controller has reported yet",
        }


def _participant(p: lkmodels.ParticipantInfo) -> Participant:
    joined = p.joined_at_ms / 1000 if p.joined_at_ms else float(p.joined_at)
    return Participant(p.identity, p.sid, joined, p.kind == _STANDARD)


def build_controller(
    config: ControllerConfig,
    *,
    registry: GrantRegistry | None = None,
    registry_complete: bool | None = None,
) -> Controller:
    """Assemble a controller from its configuration (Redis and homeserver when configured).

    ``registry`` is the service's own when the controller runs inside ``serve``; without
    Redis that registry knows this process's tokens only, which ``registry_complete`` says.
    """
    if registry is None:
        registry = RedisRegistry(config.redis_url) if config.redis_url else MemoryRegistry()
    if registry_complete is None:
        registry_complete = bool(config.redis_url)
    leadership: Leadership
    if config.redis_url:
        leadership = RedisLeadership(config.redis_url, ttl=config.leader_ttl)
    else:
        leadership = LocalLeadership()
    source: MatrixSource | None = None
    hs = config.homeserver_url
    sync = SyncSource(hs, config.access_token, auto_join=config.auto_join) if hs else None
    admin = AdminStateSource(hs, config.admin_token) if hs else None
    if sync is not None and admin is not None and config.access_token and config.admin_token:
        source = SyncAndAdminSource(sync, admin)
    elif admin is not None and config.admin_token:
        source = admin
    elif sync is not None and config.access_token:
        source = sync
    return Controller(
        config,
        registry,
        registry_complete=registry_complete,
        source=source,
        leadership=leadership,
    )
