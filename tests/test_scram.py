"""SCRAM verifiers: passwords pgfleet makes get few PBKDF2 iterations (their
192 random bits are the protection, and every login pays the iterations);
a password a person chose keeps PostgreSQL's 4,096."""

from __future__ import annotations

import psycopg
import pytest

from pgfleet.crypto import (
    MACHINE_SCRAM_ITERATIONS,
    PERSON_SCRAM_ITERATIONS,
    generate_password,
    is_machine_made,
    scram_iterations,
    scram_sha256_verifier,
    verifier_matches,
)
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.provisioning import ensure_tenant_database_provisioned
from pgfleet.tenants.service import create_project, rotate_password
from tests.helpers import FleetUnderTest
from tests.tenantdb import can_login


def stored_verifier(fleet: FleetUnderTest, region: str, role: str) -> str:
    with fleet.admin_conn(region) as a:
        row = a.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
    assert row is not None and row[0], f"{role} has no password"
    return str(row[0])


def test_our_verifiers_and_libpqs_agree(fleet: FleetUnderTest) -> None:
    password = generate_password()
    with fleet.admin_conn("us-east-1") as a:
        by_libpq = a.pgconn.encrypt_password(password.encode(), b"x", b"scram-sha-256").decode()
    assert scram_iterations(by_libpq) == PERSON_SCRAM_ITERATIONS
    assert verifier_matches(by_libpq, password)
    assert not verifier_matches(by_libpq, password + "x")
    ours = scram_sha256_verifier(password, MACHINE_SCRAM_ITERATIONS)
    assert scram_iterations(ours) == MACHINE_SCRAM_ITERATIONS
    assert verifier_matches(ours, password)
    assert not verifier_matches(ours, generate_password())
    with pytest.raises(ValueError):
        scram_sha256_verifier("pässwort", 16)  # SASLprep territory: libpq's job
    assert is_machine_made(password)
    assert not is_machine_made("correct horse battery staple")


def test_project_passwords_get_cheap_verifiers_that_log_in(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    _, prov = create_project(
        platform, owner[0], name="fast", region="eu-central-1", plan_type="free"
    )
    for role, password in ((prov.user, prov.password), (prov.ro_user, prov.ro_password)):
        verifier = stored_verifier(fleet, "eu-central-1", role)
        assert scram_iterations(verifier) == MACHINE_SCRAM_ITERATIONS
        assert verifier_matches(verifier, password)
    assert can_login(prov)
    assert can_login(prov, ro=True)
    assert not can_login(prov, generate_password())


def test_a_chosen_password_keeps_4096_iterations_until_pgfleet_rotates_it(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    region = "ap-southeast-1"
    row, _ = create_project(platform, owner[0], name="chosen", region=region, plan_type="free")
    # Shaped exactly like a machine-made one: provenance decides, not shape.
    chosen = "A" * 32
    prov = ensure_tenant_database_provisioned(
        row.id, region, desired_password=chosen, platform=platform
    )
    verifier = stored_verifier(fleet, region, prov.user)
    assert scram_iterations(verifier) == PERSON_SCRAM_ITERATIONS
    assert can_login(prov, chosen)
    assert scram_iterations(stored_verifier(fleet, region, prov.ro_user)) == (
        MACHINE_SCRAM_ITERATIONS
    )
    # Converging again keeps the person's password and its iterations.
    ensure_tenant_database_provisioned(row.id, region, platform=platform)
    assert scram_iterations(stored_verifier(fleet, region, prov.user)) == PERSON_SCRAM_ITERATIONS

    op_id = rotate_password(platform, owner[0], row.id, role="rw")
    op = OperationsRuntime.of(platform).wait(op_id, 30)
    assert op.status == "finished", op
    rotated = ensure_tenant_database_provisioned(row.id, region, platform=platform)
    assert rotated.password != chosen
    assert scram_iterations(stored_verifier(fleet, region, rotated.user)) == (
        MACHINE_SCRAM_ITERATIONS
    )
    assert can_login(rotated)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=prov.host,
            port=prov.port,
            dbname=prov.database,
            user=prov.user,
            password=chosen,
            sslmode=prov.sslmode,
            sslrootcert=prov.sslrootcert,
            connect_timeout=5,
        ).close()
