"""Issue 21: indexes for the console's lists at a million tasks (docs/admin.md).

- task_instance_created_id replaces task_instance_created, with the id (DESC): a
  task list narrowed to instances pages by (instance, created_at DESC, id DESC)
  without sorting. Added before the old one is dropped, so MySQL keeps an index
  for the instance foreign key throughout and Django adds no extra one.
- taskevent_kind_status: the event log filtered by kind and/or to-status, newest
  first by id.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0009_i19_live_retry_webhooks"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["instance", "-created_at", "-id"], name="task_instance_created_id"),
        ),
        migrations.RemoveIndex(model_name="task", name="task_instance_created"),
        migrations.AddIndex(
            model_name="taskevent",
            index=models.Index(fields=["kind", "to_status", "id"], name="taskevent_kind_status"),
        ),
    ]
