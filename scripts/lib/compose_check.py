#!/usr/bin/env python3
"""The deployment defaults of docker-compose.yml (issue 24), checked offline.

  * every published port is bound to 127.0.0.1 (a bare "5432:5432" publishes
    on every interface of the host), and no service uses the host's network;
  * the services (api, worker) connect to PostgreSQL as the application role
    (penora_app), do not migrate at start (DB_MIGRATE_ON_START=false), and
    start only after the `migrate` service has succeeded;
  * `migrate` runs `penora-ops migrate` as the schema's owner (penora_owner);
  * no service but PostgreSQL itself names the superuser;
  * the postgres service mounts an init script into
    /docker-entrypoint-initdb.d that creates both roles, penora_app without
    SUPERUSER, CREATEDB or CREATEROLE, and gives the database to the owner;
  * the program each service of the built image runs (penora-ops for
    `migrate`) is copied into the Dockerfile's last stage.

Usage:
  compose_check.py COMPOSE_FILE          exit 1 naming every problem
  compose_check.py --self-test COMPOSE_FILE
      the file must pass, and each of a set of broken copies (a port on every
      interface, the API as the superuser, a worker that migrates, no migrate
      service, an init script without the application role, ...) must fail
      on the problem it carries.
"""

import pathlib
import re
import sys

import yaml

APP_ROLE = "penora_app"
OWNER_ROLE = "penora_owner"
SUPERUSER = "postgres"
SERVICES = ("api", "worker")
INITDB = "/docker-entrypoint-initdb.d"


def db_user(url):
    """The user of a postgres:// URL (before any ${...} in the password)."""
    m = re.match(r"^postgres(?:ql)?://([^:@/]+)[:@]", str(url))
    return m.group(1) if m else None


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def port_problem(name, port):
    if isinstance(port, dict):
        if "published" not in port:
            return None
        if port.get("host_ip") != "127.0.0.1":
            return f"{name}: port {port.get('published')} is published on every interface (host_ip must be 127.0.0.1)"
        return None
    text = str(port)
    # [HOST:]PUBLISHED:TARGET[/PROTO], or TARGET alone (a random port on every interface).
    if not text.startswith("127.0.0.1:") or text.count(":") < 2:
        return f"{name}: port \"{text}\" is published on every interface (write \"127.0.0.1:{text}\")"
    return None


def depends_on(service):
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


def init_script_problems(postgres, read):
    scripts = []
    for volume in postgres.get("volumes") or []:
        text = volume if isinstance(volume, str) else f"{volume.get('source')}:{volume.get('target')}"
        parts = text.split(":")
        if len(parts) >= 2 and parts[1].startswith(INITDB) and parts[0].startswith("."):
            scripts.append(parts[0])
    if not scripts:
        return [f"postgres: no init script mounted into {INITDB} (the roles are never created)"]
    sql = ""
    for path in scripts:
        content = read(path)
        if content is None:
            return [f"postgres: init script {path} is missing"]
        sql += content + "\n"
    problems = []
    statements = {}
    for role in (OWNER_ROLE, APP_ROLE):
        m = re.search(rf"CREATE\s+ROLE\s+{role}\b([^;]*);", sql, re.I)
        if not m:
            problems.append(f"postgres: the init script does not create role {role}")
        else:
            statements[role] = m.group(1).upper()
    app = statements.get(APP_ROLE)
    if app is not None:
        for must in ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE"):
            if not re.search(rf"(?<![A-Z]){must}\b", app):
                problems.append(f"postgres: the init script creates {APP_ROLE} without {must}")
    if not re.search(rf"ALTER\s+DATABASE\s+\S+\s+OWNER\s+TO\s+{OWNER_ROLE}\b", sql, re.I):
        problems.append(f"postgres: the init script does not give the database to {OWNER_ROLE}")
    return problems


def image_problems(services, read):
    """The programs the services of the built image run must be in it."""
    built = {s.get("image") for s in services.values() if s and s.get("build")}
    dockerfile = read("Dockerfile")
    if not built or dockerfile is None:
        return []
    last_stage = re.split(r"(?m)^FROM ", dockerfile)[-1]
    shipped = set(re.findall(r"/(penora-[a-z]+)\b", " ".join(
        line for line in last_stage.splitlines() if line.startswith("COPY --from="))))
    problems = []
    for name, service in services.items():
        if not service or service.get("image") not in built:
            continue
        command = service.get("command") or []
        command = command.split() if isinstance(command, str) else [str(c) for c in command]
        if command and command[0] not in shipped:
            problems.append(f"{name}: runs {command[0]}, which the Dockerfile's last stage does not copy")
    return problems


def check(compose_text, read):
    """Every problem of the compose file `compose_text`; `read(path)` reads a
    file the compose file names (relative to it), None when missing."""
    doc = yaml.safe_load(compose_text) or {}
    services = doc.get("services") or {}
    problems = []
    for name, service in services.items():
        service = service or {}
        for port in service.get("ports") or []:
            p = port_problem(name, port)
            if p:
                problems.append(p)
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port it listens on")
        url = env_of(service).get("DATABASE_URL")
        if url is not None and name != "postgres" and db_user(url) == SUPERUSER:
            problems.append(f"{name}: DATABASE_URL connects as the superuser ({SUPERUSER})")
    for name in SERVICES:
        service = services.get(name)
        if service is None:
            problems.append(f"{name}: no such service")
            continue
        env = env_of(service)
        user = db_user(env.get("DATABASE_URL"))
        if user != APP_ROLE:
            problems.append(f"{name}: DATABASE_URL connects as {user}, not the application role {APP_ROLE}")
        if str(env.get("DB_MIGRATE_ON_START", "")).lower() != "false":
            problems.append(f"{name}: DB_MIGRATE_ON_START is not false (the application role may not migrate)")
        if depends_on(service).get("migrate") != "service_completed_successfully":
            problems.append(f"{name}: does not wait for `migrate` to complete successfully")
    migrate = services.get("migrate")
    if migrate is None:
        problems.append("migrate: no such service (penora-ops migrate as the owner)")
    else:
        command = migrate.get("command") or []
        command = command.split() if isinstance(command, str) else [str(c) for c in command]
        if command[-2:] != ["penora-ops", "migrate"]:
            problems.append(f"migrate: command is {command}, not penora-ops migrate")
        user = db_user(env_of(migrate).get("DATABASE_URL"))
        if user != OWNER_ROLE:
            problems.append(f"migrate: DATABASE_URL connects as {user}, not the owner {OWNER_ROLE}")
    postgres = services.get("postgres")
    if postgres is None:
        problems.append("postgres: no such service")
    else:
        problems += init_script_problems(postgres, read)
    return problems + image_problems(services, read)


def reader(base):
    def read(path):
        f = base / path
        return f.read_text() if f.is_file() else None
    return read


def self_test(compose, text, read):
    """Broken copies of the compose file, each with the problem it must be
    found for (a substring of one of the problems reported)."""
    init = re.search(r"\./(deploy/postgres/[^:]+):" + INITDB, text)
    init_path = "./" + init.group(1) if init else None

    def edited(which, edit):
        def read_edited(path):
            content = read(path)
            return edit(content) if path == which and content else content
        return read_edited

    def with_init(sql_edit):
        return edited(init_path, sql_edit)

    cases = [
        ("a port on every interface", text.replace('"127.0.0.1:5432:5432"', '"5432:5432"'), read,
         'postgres: port "5432:5432"'),
        ("the API's port on every interface", text.replace('"127.0.0.1:5000:5000"', '"5000:5000"'), read,
         'api: port "5000:5000"'),
        ("the management UI on every interface", text.replace('"127.0.0.1:15672:15672"', '"15672:15672"'), read,
         'rabbitmq: port "15672:15672"'),
        ("the API as the superuser",
         re.sub(r"postgres://penora_app:", "postgres://postgres:", text, count=1), read,
         "api: DATABASE_URL connects as the superuser"),
        ("a worker that migrates", re.sub(r'(?s)(worker:.*?)DB_MIGRATE_ON_START: "false"', r"\1", text, count=1), read,
         "worker: DB_MIGRATE_ON_START is not false"),
        ("migrations as the application role",
         text.replace("postgres://penora_owner:", "postgres://penora_app:"), read,
         "migrate: DATABASE_URL connects as penora_app"),
        ("no migrate service", re.sub(r"(?m)^  migrate:\n(?:    .*\n|\s*\n)*?(?=^  \w)", "", text), read,
         "migrate: no such service"),
        ("no init script", re.sub(r"(?m)^.*docker-entrypoint-initdb\.d.*\n", "", text), read,
         "no init script mounted"),
        ("an init script without the application role", text,
         with_init(lambda s: re.sub(r"CREATE ROLE penora_app\b[^;]*;", "", s)),
         "does not create role penora_app"),
        ("an application role that may create roles", text,
         with_init(lambda s: s.replace("NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT", "CREATEROLE")),
         "creates penora_app without NOCREATEROLE"),
        ("an image without penora-ops", text,
         edited("Dockerfile", lambda s: s.replace(" /src/target/release/penora-ops", "")),
         "migrate: runs penora-ops, which the Dockerfile's last stage does not copy"),
    ]
    failed = 0
    found = check(text, read)
    if found:
        print(f"{compose}: fails before any change: {found}")
        return 1
    for what, broken, broken_read, expected in cases:
        if broken == text and broken_read is read:
            print(f"self-test: '{what}' changed nothing in {compose}: the case is stale")
            failed = 1
            continue
        problems = check(broken, broken_read)
        if not any(expected in p for p in problems):
            print(f"self-test: '{what}' was not found (expected '{expected}', got {problems})")
            failed = 1
    if not failed:
        print(f"compose self-test: each of {len(cases)} broken copies fails on its problem")
    return failed


def main(argv):
    args = [a for a in argv if a != "--self-test"]
    if len(args) != 1:
        print(__doc__)
        return 2
    compose = pathlib.Path(args[0])
    text = compose.read_text()
    read = reader(compose.resolve().parent)
    if "--self-test" in argv:
        return self_test(compose, text, read)
    problems = check(text, read)
    for p in problems:
        print(f"{compose}: {p}")
    if not problems:
        print(f"{compose}: every port on 127.0.0.1, the services as {APP_ROLE} (not migrating), "
              f"migrations as {OWNER_ROLE}, both roles made by the init script")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
