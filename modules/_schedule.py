"""_schedule: how often this host's crontab and systemd timers run a job.

`check` uses it to warn when `backup-all` runs less often than a source
may go without a backup before `report` calls it stale (stale_after): a
monthly backup-all under a 2-day stale_after is CRITICAL 27 days a month.
It is plumbing, not a backup module (module names start with a letter).

What it reads: /etc/crontab and /etc/cron.d/* (lines with a user field),
the running user's crontab (`crontab -l`) and the systemd timer of the Debian package when it is enabled (its unit,
then the drop-ins of /etc/systemd/system/<timer>.d/).  What it cannot read
(another user's crontab, a timer of another name) it does not guess.

Guarantees: nothing is written; an unreadable file or a line it cannot
parse is skipped, never an error.  Intervals are the longest gap between
two runs, in seconds, with months counted as 31 days.
"""

import configparser
import glob
import os
import re
import shutil
import subprocess

CRON_FILES = ('/etc/crontab', '/etc/cron.d/*')
SYSTEMD_UNIT_DIRS = ('/etc/systemd/system', '/lib/systemd/system',
                     '/usr/lib/systemd/system')
WANTS_DIR = '/etc/systemd/system/timers.target.wants'
DAY = 86400
CRON_SHORTCUTS = {'@hourly': '0 * * * *', '@daily': '0 0 * * *',
                  '@midnight': '0 0 * * *', '@weekly': '0 0 * * 0',
                  '@monthly': '0 0 1 * *', '@yearly': '0 0 1 1 *',
                  '@annually': '0 0 1 1 *'}
CALENDAR_SHORTCUTS = {'minutely': '*-*-* *:*:00', 'hourly': '*-*-* *:00:00',
                      'daily': '*-*-* 00:00:00', 'weekly': 'Mon *-*-* 00:00:00',
                      'monthly': '*-*-01 00:00:00',
                      'quarterly': '*-01,04,07,10-01 00:00:00',
                      'semiannually': '*-01,07-01 00:00:00',
                      'yearly': '*-01-01 00:00:00',
                      'annually': '*-01-01 00:00:00'}
NAMES = {name: number for number, name in enumerate(
    ('sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'))}
NAMES.update((name, number + 1) for number, name in enumerate(
    ('jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct',
     'nov', 'dec')))


def field_values(field, low, high):
    """The values a cron field names ('*', 'a-b/n', lists, names), or None
    when it cannot tell."""
    values = set()
    for part in field.lower().split(','):
        part, _, step = part.partition('/')
        bounds = [str(low), str(high)] if part == '*' else part.split('-', 1)
        try:
            numbers = [int(NAMES.get(b[:3], b)) for b in bounds]
            step = int(step or 1)
        except ValueError:
            return None
        first, last = numbers[0], numbers[-1]
        if not low <= first <= last <= high or step < 1:
            return None
        values.update(range(first, last + 1, step))
    return sorted(values)


def largest_gap(values, cycle):
    """The longest wait between two of values, repeating every cycle."""
    if not values:
        return cycle
    return max((values[(i + 1) % len(values)] - value) % cycle or cycle
               for i, value in enumerate(values))


def cron_interval(minute, hour, dom, month, dow):
    """Longest gap between two runs of a cron schedule, in seconds (None
    when a field cannot be read)."""
    hours = field_values(hour, 0, 23)
    days = field_values(dom, 1, 31)
    weekdays = field_values(dow, 0, 7)
    months = field_values(month, 1, 12)
    if None in (hours, days, weekdays, months):
        return None
    gaps = []
    if dom != '*' or dow == '*':
        gaps.append(largest_gap([d - 1 for d in days], 31))
    if dow != '*':     # 7 is Sunday too
        gaps.append(largest_gap(sorted({d % 7 for d in weekdays}), 7))
    day_gap = min(gaps)     # cron runs when either day field matches
    if month != '*':
        day_gap = max(day_gap, (largest_gap(months, 12) - 1) * 31 + 1)
    if day_gap == 1:
        return largest_gap(hours, 24) * 3600
    return day_gap * DAY


def calendar_interval(spec):
    """Longest gap between two runs of a systemd OnCalendar= value (the
    usual forms: shortcuts, '[DOW] [Y-]M-D HH:MM[:SS]'), or None."""
    spec = CALENDAR_SHORTCUTS.get(spec.strip().lower(), spec.strip())
    words = spec.split()
    dow = '*'
    if words and re.match(r'[A-Za-z]', words[0]):
        dow = words.pop(0).replace('..', '-')
    if len(words) != 2:
        return None
    date, clock = words
    date_parts = date.split('-')
    hour = clock.split(':')[0]
    if len(date_parts) not in (2, 3) or not hour:
        return None
    month, dom = date_parts[-2:]
    return cron_interval('0', hour, dom, month, dow)


def crontab_schedules(words, lines, where, user_field=True):
    """[(interval, 'where: line')] of the crontab lines whose command
    contains every one of words."""
    found = []
    for line in lines:
        fields = line.split()
        if not fields or fields[0].startswith('#') or \
                not all(w in line for w in words):
            continue
        if fields[0] in CRON_SHORTCUTS:
            fields = CRON_SHORTCUTS[fields[0]].split() + fields[1:]
        if len(fields) < (7 if user_field else 6):
            continue
        interval = cron_interval(*fields[:5])
        if interval:
            found.append((interval, '%s: %s' % (where, line.strip())))
    return found


def cron_schedules(words):
    """The system crontabs' lines (with a user field) running words."""
    found = []
    for pattern in CRON_FILES:
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path, errors='replace') as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            found += crontab_schedules(words, lines, path)
    return found


def user_crontab_schedules(words):
    """The running user's own crontab (`crontab -l`), lines running words."""
    if not shutil.which('crontab'):
        return []
    try:
        proc = subprocess.run(['crontab', '-l'], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL,
                              universal_newlines=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    return crontab_schedules(words, proc.stdout.splitlines(), 'crontab -l',
                             user_field=False)


def timer_schedule(timer):
    """(interval, 'timer: OnCalendar=...') of an enabled timer, or None."""
    unit_dirs, wants_dir = SYSTEMD_UNIT_DIRS, WANTS_DIR
    if not os.path.lexists(os.path.join(wants_dir, timer)):
        return None
    unit = next((os.path.join(d, timer) for d in unit_dirs
                 if os.path.isfile(os.path.join(d, timer))), None)
    if unit is None:
        return None
    paths = [unit] + sorted(glob.glob(os.path.join(
        unit_dirs[0], timer + '.d', '*.conf')))
    calendars = []
    for path in paths:
        parser = configparser.RawConfigParser(strict=False)
        parser.optionxform = str
        try:
            parser.read(path)
            value = parser.get('Timer', 'OnCalendar', fallback=None)
        except configparser.Error:
            continue
        if value is not None:
            # An empty OnCalendar= resets the list (systemd.timer(5)).
            calendars = [value] if value else []
    intervals = [i for i in map(calendar_interval, calendars) if i]
    if not intervals:
        return None
    return min(intervals), '%s: OnCalendar=%s' % (timer, calendars[-1])


def enabled_timers(pattern):
    """The names of the enabled systemd timers matching a glob pattern."""
    return sorted(os.path.basename(path) for path in
                  glob.glob(os.path.join(WANTS_DIR, pattern)))


def schedules(words, timer):
    """Every schedule of a job this host shows: [(interval, where)]."""
    found = cron_schedules(words) + user_crontab_schedules(words)
    enabled = timer_schedule(timer)
    return found + ([enabled] if enabled else [])


def duration_text(seconds):
    if seconds % DAY == 0:
        return '%dd' % (seconds // DAY)
    return '%dh' % (seconds // 3600) if seconds % 3600 == 0 \
        else '%ds' % seconds


def backup_all_warnings(stale_after, stale_where, found=None):
    """Warnings for every backup-all schedule that runs less often than
    stale_after (seconds) asks for."""
    if found is None:
        found = schedules(('backup-all',), 'gitbackup-client-backup-all.timer')
    return ['backup-all runs every %s (%s), but %s = %s calls a source '
            'stale sooner: run backup-all daily (e.g. 0 23 * * *)'
            % (duration_text(interval), where, stale_where,
               duration_text(stale_after))
            for interval, where in found if interval > stale_after]
